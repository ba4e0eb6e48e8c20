"""The chat template's thinking switch, added to a template that has none.

Qwen3's template takes `enable_thinking`; the embedded SmolLM2's does not, so the workbench
used to ask for reasoning in a system instruction, which a 135M model ignores. The switch
added here opens the think block in the generation prompt when `enable_thinking` is true
(as DeepSeek-R1's template does), so a trained model starts reasoning at once and the
engine's parser starts in the reasoning channel; when it is false or not given, the prompt
is exactly the original template's, so a user of stock transformers sees the model as
before. The generation prompt is the last thing a chat template renders, so appending the
switch works for any template.
"""

from __future__ import annotations

from workbench.engine.thinking import OPEN_TAG

SWITCH = (
    "{% if add_generation_prompt and enable_thinking is defined and enable_thinking %}" + OPEN_TAG + "\n{% endif %}"
)


def with_thinking_switch(template: str) -> str:
    if "enable_thinking" in template:
        raise ValueError("this chat template already has an enable_thinking switch; train on it as it is")
    return template + SWITCH
