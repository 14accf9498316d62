"""Case reports: the PDF (reportlab) and the FHIR R4 Bundle, both built from the stored case."""
