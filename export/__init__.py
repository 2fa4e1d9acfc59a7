"""sottovoce export toolchain (workstation): real models -> ONNX -> INT8 -> validated, signed bundle."""
