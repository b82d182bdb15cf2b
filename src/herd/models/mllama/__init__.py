"""mllama (Llama 3.2 Vision): its image processor so far; the model follows."""
