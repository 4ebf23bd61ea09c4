"""The training prompt format, shared by training and held-out evaluation."""


def build_training_prompt(instruction: str, input: str = "") -> str:
    """Text before the response, without special tokens: ``instruction[\\ninput]`` as in the reference code."""
    return f"{instruction}\n{input}" if input else instruction
