"""What a :class:`~.engine.FillRequest` may ask for (also the command line's help text; no torch here)."""

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 256, 1536, 16  # output pixels per side, as the hosted FLUX Fill APIs
MAX_STEPS = 100
MAX_GUIDANCE = 100.0
MAX_IMAGES = 8
MAX_SEED = 2**64 - 1
MAX_SEQUENCE_LENGTH = 512  # T5 tokens: what FLUX.1 Fill [dev] was trained with
