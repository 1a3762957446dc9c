"""dualobj.attention (see docs/)."""
