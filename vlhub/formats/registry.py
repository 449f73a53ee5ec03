"""The checkpoint formats vlhub reads and writes, and the file names their ecosystems use."""

from __future__ import annotations

from dataclasses import dataclass

from vlhub.formats.base import ShardWriter, TensorFile
from vlhub.formats.pdparams_io import PdparamsFile, PdparamsShardWriter
from vlhub.formats.safetensors_io import SafetensorsFile, SafetensorsShardWriter
from vlhub.formats.torch_io import TorchBinFile, TorchBinShardWriter


@dataclass(frozen=True)
class Format:
    """A checkpoint format: its reader, shard writer and naming (HF / PaddleNLP conventions)."""

    name: str
    reader: type[TensorFile]
    writer: type[ShardWriter]
    single_file: str
    shard_pattern: str  # formatted with index= and count=
    index_file: str
    suffixes: tuple[str, ...]
    default_max_shard_size: int

    def shard_name(self, index: int, count: int) -> str:
        return self.shard_pattern.format(index=index, count=count)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("safetensors", SafetensorsFile, SafetensorsShardWriter, "model.safetensors",
               "model-{index:05d}-of-{count:05d}.safetensors", "model.safetensors.index.json",
               (".safetensors",), 5 * 10**9),
        Format("pdparams", PdparamsFile, PdparamsShardWriter, "model_state.pdparams",
               "model_state-{index:05d}-of-{count:05d}.pdparams", "model_state.pdparams.index.json",
               (".pdparams",), 10 * 10**9),
        Format("torch", TorchBinFile, TorchBinShardWriter, "pytorch_model.bin",
               "pytorch_model-{index:05d}-of-{count:05d}.bin", "pytorch_model.bin.index.json",
               (".bin", ".pt", ".pth"), 10 * 10**9),
    )
}
# PaddleNLP's `_resolve_model_file_path` order: what a Paddle loader would pick in a mixed directory
DIRECTORY_PRECEDENCE = ("safetensors", "pdparams", "torch")


def format_of_file(name: str) -> Format | None:
    """The format a weight file's name says it is, if any."""
    for fmt in FORMATS.values():
        if name.endswith(fmt.suffixes):
            return fmt
    return None
