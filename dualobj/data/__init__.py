"""dualobj.data (see docs/)."""
