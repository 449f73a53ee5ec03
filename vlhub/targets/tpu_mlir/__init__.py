"""`--to tpu-mlir`: the model directory and compile scripts Sophgo's TPU-MLIR takes, the older flow's ONNX
networks, and the simulator stage of its smoke test."""
