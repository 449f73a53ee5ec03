"""`vlhub dump-embeddings`: the embedding table as raw rows (`embed_tokens.bin`) for host-side token embedding.

Examples:
    vlhub dump-embeddings qwen2-vl-7b
    vlhub dump-embeddings ./Qwen2-VL-7B-Instruct --out vacc/embed_tokens.bin --lm-head
    vlhub dump-embeddings ./Qwen-VL-paddle --format npy --dtype float32
    vlhub dump-embeddings ./ckpt --tensor model.embed_tokens.weight --json
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, SourceArg, choices
from vlhub.cli._output import byte_progress, print_json, stdout
from vlhub.embeddings import DTYPES, FORMATS, prepare_dump
from vlhub.units import format_size

OutOpt = Annotated[
    str | None,
    typer.Option("--out", help="Output file, or an existing directory to write embed_tokens.<format> into "
                               "(default: ./embed_tokens.<format>). The sidecar JSON and lm_head go beside it.",
                 show_default=False),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", metavar=choices(DTYPES),
                                       help=f"Output dtype: {', '.join(DTYPES)} (rounded to nearest even).")]
FormatOpt = Annotated[
    str,
    typer.Option("--format", metavar=choices(FORMATS),
                 help=f"{' or '.join(FORMATS)}. bin: raw little-endian row-major [vocab, hidden], no header (what the "
                      "VastAI runtime reads); npy: a standard .npy file (not for bfloat16, which numpy lacks)."),
]
TensorOpt = Annotated[
    str | None,
    typer.Option("--tensor", metavar="NAME", show_default=False,
                 help="Dump this 2-D tensor instead of the embedding the family's key map names."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files and sidecars.")]
LmHeadOpt = Annotated[
    bool,
    typer.Option("--lm-head", help="Also write the output projection as lm_head.<format> beside --out (the "
                                   "embedding when the model ties them), [vocab, hidden] in every layout."),
]


@reports_errors
def dump_embeddings(
    source: SourceArg,
    out: OutOpt = None,
    dtype: DtypeOpt = "float16",
    format: FormatOpt = "bin",
    tensor: TensorOpt = None,
    lm_head: LmHeadOpt = False,
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Write the token-embedding table to a file.

    Row i is token i, written without loading the model: found through the key map
    in any layout and format, streamed in row blocks, cast, written atomically beside a JSON sidecar (shape,
    dtype, source, tensor, layout, sha256); an existing output is kept unless --overwrite. --json prints a list
    with each sidecar's content and path."""
    dump = prepare_dump(source, out=out, dtype=dtype, format=format, tensor=tensor, lm_head=lm_head,
                        overwrite=overwrite)
    with byte_progress("dumping embeddings", dump.total_bytes) as advance:
        files = dump.write(on_bytes=advance)
    if json:
        print_json([{"path": str(f.path), "sidecar": str(f.sidecar), **f.info} for f in files])
        return
    for f in files:
        rows, cols = f.info["shape"]
        stdout.print(f"{escape(str(f.path))}  ({rows} x {cols} {f.info['dtype']}, {format_size(f.info['size'])}; "
                     f"from {escape(f.info['tensor'])}{', tied' if f.info.get('tied') else ''})")
