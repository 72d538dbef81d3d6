"""Text conditioning: the umT5-xxl encoder (``umt5``) that turns prompts into the Wan DiT's
(B, 512, 4096) text embeddings, its converter from the released weights (``convert``), and
the tokenizer with the reference's prompt cleaning (``tokenizer``)."""
