"""`--to tpu-mlir`: the model directory and compile scripts Sophgo's TPU-MLIR takes, the older flow's ONNX
networks, and the simulator stage of its smoke test."""

NAME = "tpu-mlir"  # the target's name: its `--to`, its cache key, its manifest's target.name
