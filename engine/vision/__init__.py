"""Image understanding for Qwen2-VL / Qwen2.5-VL: a `qwen2vl` language model plus a `clip` mmproj file.

    preprocess.py   image bytes -> RGB -> smart_resize -> normalized patches (transformers' layout)
    projector.py    mmproj GGUF -> VisionConfig + VisionWeights (llama.cpp's tools/mtmd names)
    encoder.py      the vision transformer and patch merger: patches -> LM embeddings
    mrope.py        2-D RoPE of the encoder, M-RoPE position ids of the language model
    multimodal.py   placeholder expansion, image embeddings into the prompt, prefill, finding the mmproj
    ops.py          LayerNorm, GELU, bidirectional attention

See docs/vision.md.
"""
