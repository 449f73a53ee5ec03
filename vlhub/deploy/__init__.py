"""What every deployment target shares: the `Target` protocol (`target.py`), the checklist's vocabulary
(`checks.py`) and the ONNX graph builder two targets export with (`onnx_graph.py`). The targets themselves are
`vlhub.targets.<target>`, which never import each other."""
