"""Pure functional core of test-time training on torch.func: params in, new params out."""
