"""The networks, always transformers': hub access, the ViTPose engine, the RT-DETR detector, routing, conversion."""
