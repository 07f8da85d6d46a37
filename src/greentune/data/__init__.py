"""Training data: read (`sources`), tokenise with loss masks (`templates`), pack and batch (`packing`)."""
from greentune.data.build import build_datasets, split_documents
from greentune.data.packing import IGNORE_INDEX, BatchStream, PackedData, pack
from greentune.data.sources import ChatSample, PromptSample, Sample, TextSample, read_samples
from greentune.data.templates import Tokenized, tokenize

__all__ = ["build_datasets", "split_documents", "IGNORE_INDEX", "BatchStream", "PackedData", "pack",
           "ChatSample", "PromptSample", "Sample", "TextSample", "read_samples", "Tokenized", "tokenize"]
