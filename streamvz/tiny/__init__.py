"""streamvz-tiny: DINOv2-S + VisionZip + trained projector + SmolLM2-135M-Instruct."""
