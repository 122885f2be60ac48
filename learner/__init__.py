"""learner room."""
