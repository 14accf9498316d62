"""The DICOM node (edge): a Storage SCP that turns studies into cases and sends the answers back."""
