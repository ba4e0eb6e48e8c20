"""Hugging Face Space entry point: the same app as `python -m workbench.ui`.

A Space sets GRADIO_SERVER_NAME=0.0.0.0 (and may set GRADIO_SERVER_PORT); both are honoured,
so this file runs unchanged there (docs/space.md has the Dockerfile and README front matter).
"""

from workbench.ui.__main__ import main

if __name__ == "__main__":
    main()
