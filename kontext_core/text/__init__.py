"""The prompt's encoders: T5-XXL and CLIP-L from ComfyUI or diffusers files, with the bundled tokenizers."""
