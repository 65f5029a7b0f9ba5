"""Text generation on the model's cached forward: requests, the compiled loop, samplers, beam search."""
