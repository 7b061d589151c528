"""kubetrain operator: turns TrainingJobs into torchrun pod groups, tracks status, recovers from preemption."""
