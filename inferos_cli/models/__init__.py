"""Model acquisition and conversion.

``resolve`` (``--model`` -> a ready ONNX folder, parameter counts), ``registry`` (aliases and downloads), ``info``
(facts read from an ONNX folder), ``params`` (parameter counts and size classes), ``tokenizer``; conversion:
``hf`` / ``gguf`` read a source into ``weights``, ``builders`` write the decoder graph, ``convert`` writes the
folder, ``manifest`` records and checks its integrity.
"""
