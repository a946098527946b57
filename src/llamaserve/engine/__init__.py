"""Starting and watching the llama.cpp servers that run the model."""
