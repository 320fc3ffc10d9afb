"""Data for multi-task MLLM fine-tuning (paper Sec. 4.1): the vicuna_v1 template, LLaVA/DataOptim
records, multi-task mixing, image loading, collation, and the synthetic embedded-default data set.

(Work in progress: the template constants below are the contract models.py builds on.)
"""

from __future__ import annotations

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Paper Sec. 4.1: one of five instructions is sampled per caption record.
CAPTION_PROMPTS = (
    "Describe the image as simply as possible with a sentence or phrase",
    "Give a brief summary of what you see",
    "Provide a short description of the image",
    "Write a short description for the image",
    "Briefly describe the content of the image",
)
# Paper Sec. 4.1: suffix of every multiple-choice question.
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


def pad_to_square(image: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's pad-to-square: centre the image on a square canvas of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_rgb)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
