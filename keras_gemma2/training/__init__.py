"""Training, distillation (online and offline), checkpoint merging and multi-device layouts."""
