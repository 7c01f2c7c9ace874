"""What is done to the weights around quantisation: rotations' matrices (``hadamard``), who
reads and writes the residual stream (``layout``), rotations fused into the weights
(``fuse``), learned rotations and smoothing (``learned``) and GPTQ rounding (``gptq``)."""
