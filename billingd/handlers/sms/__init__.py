"""SMS billing from Jasmin (seed 002): bills (`sms_billing`), delivery receipts (`sms_dlr`), the
ledger outcome of a charge (`charges`), and Jasmin's native formats (`jasmin`, `jasmin_pickle`,
`jasmin_receipts`)."""
