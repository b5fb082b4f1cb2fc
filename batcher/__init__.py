"""batcher: a rate-limit-aware batch engine for OpenAI-compatible chat-completion APIs."""

__version__ = "0.1.0"
