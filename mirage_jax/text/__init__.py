"""Text conditioning in JAX: the umT5-xxl tokenizer, prompt cleaning and encoder."""
