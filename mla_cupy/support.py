"""What mla_cupy supports: the single source of truth for validators, tests and the README.

Every constant here is mirrored by the support matrix in README.md; the validators in
``_validate.py`` and the tests import these names rather than repeating the numbers.
"""

# (head_dim, head_dim_v) pairs: DeepSeek V2/V3 (576/512), no-rope latent (512/512), latent rank 256.
HEAD_DIMS = ((576, 512), (512, 512), (320, 256))

# Element types of q, k_cache and out (NumPy / CuPy dtype names).
DTYPES = ("bfloat16", "float16")

# Paged KV cache: tokens per page (block) of k_cache.
MIN_PAGE_BLOCK_SIZE = 1
MAX_PAGE_BLOCK_SIZE = 256

# Oldest GPU the portable kernel runs on: (major, minor) compute capability.
MIN_COMPUTE_CAPABILITY = (8, 0)

# Tile scheduler constants (FlashMLA's scheme): tokens per scheduling block, the fixed cost of a
# request in blocks, and the number of int32 fields per entry of tile_scheduler_metadata.
SCHED_BLOCK_TOKENS = 64
SCHED_FIXED_OVERHEAD_BLOCKS = 5
SCHED_METADATA_SIZE = 8
# The scheduler's larger candidate payload, P + (P >> SCHED_PAYLOAD_STEP_SHIFT) blocks, taken where it
# at least halves the splits of P (``scheduler.choose_payload``).
SCHED_PAYLOAD_STEP_SHIFT = 6

# Data types of the auxiliary arrays.
INDEX_DTYPE = "int32"
LSE_DTYPE = "float32"
