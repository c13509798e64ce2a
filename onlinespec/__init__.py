"""OnlineSpec: speculative decoding whose drafters learn online from live traffic."""

__version__ = "0.1.0"
