"""dualobj.evaluation (see docs/)."""
