"""What a :class:`~.engine.FillRequest` may ask for (also the command line's help text; no torch here)."""

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 1536, 16  # output pixels per side, as the hosted FLUX Fill APIs
MAX_STEPS = 100
MAX_GUIDANCE = 100.0
MAX_IMAGES = 8
MAX_SEED = 2**64 - 1
MAX_SEQUENCE_LENGTH = 512  # T5 tokens: what FLUX.1 Fill [dev] was trained with
MAX_PROMPT_CHARS = 10_000  # far above what 512 T5 tokens hold; a cap on what one request may send
MAX_INPUT_MEGAPIXELS = 40.0  # input images above this are refused from their header, before decoding

# The drop-in follows diffusers' open ranges, with ceilings so a typo cannot try to allocate hundreds
# of GB (1e9 steps, 1e7 images, a 200000-pixel side).
MAX_CALL_SIDE = 8192
MAX_CALL_STEPS = 1000
MAX_CALL_BATCH = 64  # prompts x num_images_per_prompt

# Fill options (pixels of the output unless said otherwise).
MAX_MASK_GROW = 256
MAX_MASK_BLUR = 128
MAX_CROP_PADDING = 1024
MAX_OUTPAINT = 2048
# The working resolution the engine may choose: a 256x256 to a 1536x1536 square's area.
MIN_WORKING_MEGAPIXELS = 0.065
MAX_WORKING_MEGAPIXELS = 2.36

# LoRAs of a request: at most 3 (EngineConfig.max_loras's default, as the hosted FLUX Fill APIs); scales
# beyond 4 are typos or noise (1.0 is the LoRA as trained).
MAX_LORAS = 3
MAX_LORA_SCALE = 4.0
