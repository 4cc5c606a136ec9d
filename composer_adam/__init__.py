"""adamkit for MosaicML Composer."""
