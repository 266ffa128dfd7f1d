"""Pure control-plane decisions: forecasting, P/D ratio, routing."""
