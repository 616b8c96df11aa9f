"""dscompile: compile DeepSeek-V2/V3 checkpoints into verified inference engines."""
