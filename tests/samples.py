"""The provider's documented GetCallback sample item, as the record every parser must make of it.

Shared by the tests of the client (tests/unit/test_esms_client.py) and of the parser
(tests/unit/test_records.py): one definition of what the sample means.
"""

from __future__ import annotations

from decimal import Decimal

from worker.records import CallbackRecord

SAMPLE_OA_ID = "1090257973118325189"
SAMPLE_ERROR_INFO = (
    '{"error":-124,"message":"Access token is invalid"}'
    "Object reference not set to an instance of an object."
)
SAMPLE_RECORD = CallbackRecord(
    ref_id="4a496110-9fd3-4838-ac8b-bcaa36616f7011",
    send_status=5,
    send_success=0,
    send_failed=1,
    total_receiver=1,
    total_sent=1,
    type_id=25,
    telco_id=1,
    total_price=Decimal("0.0"),
    request_id=None,
    phone_number="0909090909",
    callback_url="https://api.esms.vn/zalo-zns/zns/receive-callback",
    partner_ids="7984e9b198c40e9957d6",
    error_info=SAMPLE_ERROR_INFO,
    oa_id=SAMPLE_OA_ID,
    zns_temp_id="228386",
)
