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
