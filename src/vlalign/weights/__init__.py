"""Weight files: safe reading (safetensors / weights_only), init_from loading, import of published checkpoints."""
