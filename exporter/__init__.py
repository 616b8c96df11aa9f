"""The export job: options, the job from checkpoint to OUT, its manifest, atomic OUT folders."""
