"""Labelled text and instruction data: local folders or hub datasets, columns, partitioners
(flwr-datasets), tokenized batches."""
