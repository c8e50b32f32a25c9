"""LightningDataModules: pre-training from WebDataset shards or JSON caption lists, retrieval evaluation data."""

from vlalign.datamodules.base import PretrainDataModule
from vlalign.datamodules.collate import TooManyBadSamples
from vlalign.datamodules.json_captions import JsonCaptionDataModule, JsonCaptionDataset
from vlalign.datamodules.retrieval import RetrievalCollate, RetrievalEvalDataset
from vlalign.datamodules.webdataset import ShardDataModule, ShardSource, ShardStream

__all__ = [
    "JsonCaptionDataModule",
    "JsonCaptionDataset",
    "PretrainDataModule",
    "RetrievalCollate",
    "RetrievalEvalDataset",
    "ShardDataModule",
    "ShardSource",
    "ShardStream",
    "TooManyBadSamples",
]
