"""Floodgate: Kafka stream processing for mail providers, so that a spam flood never delays ham."""

__version__ = "0.1.0"
