"""dualobj.metrics (see docs/)."""
