"""Vendored from Django 6.1.3 (sdist ``django-6.1.3.tar.gz``), verbatim:

* from ``tests/mail/__init__.py``: ``override_deprecated_email_settings``;
* from ``tests/mail/tests.py``: the CPython #128110 workaround,
  ``message_from_bytes`` and ``MailTestsMixin``;
* from ``tests/mail/test_backends.py``: ``SharedEmailBackendTests``.

The modules' import blocks are cut down to what these use; nothing else is
changed. Django's license: ``LICENSE`` beside this file. Run against
mailqueue by ``test_django61.py``.
"""

# ruff: noqa
# mypy: ignore-errors
# fmt: off

import re
from contextlib import nullcontext
from email import message_from_bytes as _message_from_bytes
from email import policy
from email.headerregistry import Address
from unittest import mock

from django.conf import DEPRECATED_EMAIL_SETTINGS, EMAIL_SETTING_DEPRECATED_MSG
from django.conf import settings
from django.core import mail
from django.core.mail import EmailAttachment, EmailMessage, InvalidMailer
from django.test import ignore_warnings, override_settings
from django.utils.deprecation import RemovedInDjango2028Warning


# RemovedInDjango2028Warning.
class override_deprecated_email_settings(override_settings):
    """Override settings, ignoring warnings for deprecated email settings.

    Like override_settings(), but suppresses deprecation warnings related to
    defining the overridden settings. Other settings can be included.

    Warnings are ignored only while installing and restoring the settings
    overrides, not for code within the context.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        deprecated_names = [
            name for name in kwargs if name in DEPRECATED_EMAIL_SETTINGS
        ]
        if deprecated_names:
            assert "{name}" in EMAIL_SETTING_DEPRECATED_MSG
            deprecated_names_re = r"|".join(
                re.escape(name) for name in deprecated_names
            )
            message_re = re.escape(EMAIL_SETTING_DEPRECATED_MSG).replace(
                re.escape("{name}"), rf"(?:{deprecated_names_re})"
            )
            self.ignore_warnings = ignore_warnings(
                category=RemovedInDjango2028Warning, message=message_re
            )
        else:
            self.ignore_warnings = nullcontext()

    def enable(self):
        with self.ignore_warnings:
            super().enable()

    def disable(self):
        with self.ignore_warnings:
            super().disable()



# Check whether python/cpython#128110 has been fixed by seeing if space between
# encoded-words is ignored (as required by RFC 2047 section 6.2).
NEEDS_CPYTHON_128110_WORKAROUND = (
    _message_from_bytes(b"To: =??q?a?= =??q?b?= <to@ex>", policy=policy.default)
)["To"].addresses[0].display_name != "ab"

RFC2047_PREFIX = "=?"  # start of an encoded-word.


def _apply_cpython_128110_workaround(message, msg_bytes):
    """
    Updates message in place to correct misparsed rfc2047 display-names in
    address headers caused by https://github.com/python/cpython/issues/128110.
    """
    from email.header import decode_header
    from email.headerregistry import AddressHeader
    from email.parser import BytesHeaderParser
    from email.utils import getaddresses

    def rfc2047_decode(s):
        # Decode using legacy decode_header() (which doesn't have the bug).
        return "".join(
            (
                segment
                if charset is None and isinstance(segment, str)
                else segment.decode(charset or "ascii")
            )
            for segment, charset in decode_header(s)
        )

    def build_address(name, address):
        if "@" in address:
            return Address(display_name=name, addr_spec=address)
        return Address(display_name=name, username=address, domain="")

    # This workaround only applies to messages parsed with a modern policy.
    assert not isinstance(message.policy, policy.Compat32)

    # Reparse with compat32 to get access to raw (undecoded) headers.
    raw_headers = BytesHeaderParser(policy=policy.compat32).parsebytes(msg_bytes)
    for header, modern_value in message.items():
        if not isinstance(modern_value, AddressHeader):
            # The bug only affects structured address headers.
            continue
        raw_value = raw_headers[header]
        if RFC2047_PREFIX in raw_value:
            # Headers should not appear more than once.
            assert len(message.get_all(header)) == 1
            # Reconstruct Address objects using legacy APIs.
            unfolded = raw_value.replace("\r\n", "").replace("\n", "")
            corrected_addresses = (
                build_address(rfc2047_decode(name), address)
                for name, address in getaddresses([unfolded])
            )
            message.replace_header(header, corrected_addresses)


def message_from_bytes(s):
    """
    email.message_from_bytes() using modern email.policy.default.
    Returns a modern email.message.EmailMessage.
    """
    # The modern email parser has a bug with adjacent rfc2047 encoded-words.
    # This doesn't affect django.core.mail (which doesn't parse messages),
    # but it can confuse our tests that try to verify sent content by reparsing
    # the generated message. Apply a workaround if needed.
    message = _message_from_bytes(s, policy=policy.default)
    if NEEDS_CPYTHON_128110_WORKAROUND and RFC2047_PREFIX.encode() in s:
        _apply_cpython_128110_workaround(message, s)
    return message


class MailTestsMixin:
    def assertMessageHasHeaders(self, message, headers):
        """
        Asserts that the `message` has all `headers`.

        message: can be an instance of an email.Message subclass or bytes
                 with the contents of an email message.
        headers: should be a set of (header-name, header-value) tuples.
        """
        if isinstance(message, bytes):
            message = message_from_bytes(message)
        msg_headers = set(message.items())
        if not headers.issubset(msg_headers):
            missing = "\n".join(f"  {h}: {v}" for h, v in headers - msg_headers)
            actual = "\n".join(f"  {h}: {v}" for h, v in msg_headers)
            raise self.failureException(
                f"Expected headers not found in message.\n"
                f"Missing headers:\n{missing}\n"
                f"Actual headers:\n{actual}"
            )

    # In assertStartsWith()/assertEndsWith() failure messages, when truncating
    # a long first ("haystack") string, include this many characters beyond the
    # length of the second ("needle") string.
    START_END_EXTRA_CONTEXT = 15

    def assertStartsWith(self, first, second):
        if not first.startswith(second):
            # Use assertEqual() for failure message with diffs. If first value
            # is much longer than second, truncate end and add an ellipsis.
            self.longMessage = True
            max_len = len(second) + self.START_END_EXTRA_CONTEXT
            start_of_first = (
                first
                if len(first) <= max_len
                else first[:max_len] + ("…" if isinstance(first, str) else b"...")
            )
            self.assertEqual(
                start_of_first,
                second,
                "First string doesn't start with the second.",
            )

    def assertEndsWith(self, first, second):
        if not first.endswith(second):
            # Use assertEqual() for failure message with diffs. If first value
            # is much longer than second, truncate start and prepend an
            # ellipsis.
            self.longMessage = True
            max_len = len(second) + self.START_END_EXTRA_CONTEXT
            end_of_first = (
                first
                if len(first) <= max_len
                else ("…" if isinstance(first, str) else b"...") + first[-max_len:]
            )
            self.assertEqual(
                end_of_first,
                second,
                "First string doesn't end with the second.",
            )

    def get_outbox_message(self, index=0, expected_count=1):
        """
        Return a (Django) EmailMessage from the locmem outbox.

        If expected_count is not None, first assert that the outbox has exactly
        the expected number of messages.
        """
        if expected_count is not None:
            assert expected_count > index  # Require valid args.
            self.assertEqual(len(mail.outbox), expected_count)
        else:
            self.assertGreater(len(mail.outbox), index)
        return mail.outbox[index].message()

    def get_raw_attachments(self, django_message):
        """
        Return a list of the raw attachment parts in the MIME message generated
        by serializing django_message and reparsing the result.

        This returns only "top-level" attachments. It will not descend into
        message/* attached emails to find nested attachments.
        """
        msg_bytes = django_message.message().as_bytes()
        message = message_from_bytes(msg_bytes)
        return list(message.iter_attachments())

    def get_decoded_attachments(self, django_message):
        """
        Return a list of decoded attachments resulting from serializing
        django_message and reparsing the result.

        Each attachment is returned as an EmailAttachment named tuple with
        fields filename, content, and mimetype. The content will be decoded
        to str for mimetype text/*; retained as bytes for other mimetypes.
        """
        return [
            EmailAttachment(
                attachment.get_filename(),
                attachment.get_content(),
                attachment.get_content_type(),
            )
            for attachment in self.get_raw_attachments(django_message)
        ]

    def get_message_structure(self, message, level=0):
        """
        Return a multiline indented string representation
        of the message's MIME content-type structure, e.g.:

            multipart/mixed
                multipart/alternative
                    text/plain
                    text/html
                image/jpg
                text/calendar
        """
        # Adapted from email.iterators._structure().
        indent = " " * (level * 4)
        structure = [f"{indent}{message.get_content_type()}\n"]
        if message.is_multipart():
            for subpart in message.get_payload():
                structure.append(self.get_message_structure(subpart, level + 1))
        return "".join(structure)

    # RemovedInDjango2028Warning.
    def use_email_backend(self, backend):
        if hasattr(settings, "MAILERS"):
            return self.settings(MAILERS={"default": {"BACKEND": backend}})
        else:
            return override_deprecated_email_settings(EMAIL_BACKEND=backend)


class SharedEmailBackendTests(MailTestsMixin):
    """Common test cases run against each EmailBackend."""

    # Subclasses must set to the EmailBackend class being tested.
    backend_class = None

    # Create an instance of the backend_class for use in this test context
    # (configured for use with get_mailbox_content() and flush_mailbox()).
    # Subclasses should override to default kwargs for testing if needed.
    def create_backend(self, *, alias="test_alias", **kwargs):
        if self.backend_class is None:
            raise NotImplementedError(
                "Subclasses of SharedEmailBackendTests must provide a "
                "backend_class attribute."
            )
        if alias is not None:
            kwargs["alias"] = alias
        return self.backend_class(**kwargs)

    def get_mailbox_content(self):
        raise NotImplementedError(
            "Subclasses of SharedEmailBackendTests must provide a "
            "get_mailbox_content() method."
        )

    def flush_mailbox(self):
        raise NotImplementedError(
            "Subclasses of SharedEmailBackendTests may require a "
            "flush_mailbox() method."
        )

    def get_the_message(self):
        mailbox = self.get_mailbox_content()
        self.assertEqual(
            len(mailbox),
            1,
            "Expected exactly one message, got %d.\n%r"
            % (len(mailbox), [m.as_string() for m in mailbox]),
        )
        return mailbox[0]

    def test_accepts_alias(self):
        backend = self.create_backend(alias="this-alias")
        self.assertEqual(backend.alias, "this-alias")

    # RemovedInDjango2028Warning.
    def test_alias_is_optional_during_transition_to_mailers(self):
        # alias=None tells create_backend() to _omit_ the `alias` arg.
        backend = self.create_backend(alias=None)
        self.assertIsNone(backend.alias)

    def test_create_from_mailers(self, required_options=None):
        # Subclasses must override this test case if any options are required.
        backend_import_path = (
            f"{self.backend_class.__module__}.{self.backend_class.__name__}"
        )
        with self.settings(
            MAILERS={
                "custom": {
                    "BACKEND": backend_import_path,
                    "OPTIONS": required_options or {},
                }
            }
        ):
            backend = mail.mailers["custom"]
            self.assertIsInstance(backend, self.backend_class)
            self.assertEqual(backend.alias, "custom")

    def test_send(self):
        email = EmailMessage(
            "Subject", "Content\n", "from@example.com", ["to@example.com"]
        )
        num_sent = self.create_backend().send_messages([email])
        self.assertEqual(num_sent, 1)
        message = self.get_the_message()
        self.assertEqual(message["subject"], "Subject")
        self.assertEqual(message.get_content(), "Content\n")
        self.assertEqual(message["from"], "from@example.com")
        self.assertEqual(message.get_all("to"), ["to@example.com"])

    def test_send_unicode(self):
        email = EmailMessage(
            "Chère maman",
            "Je t'aime très fort\n",
            "from@example.com",
            ["to@example.com"],
        )
        num_sent = self.create_backend().send_messages([email])
        self.assertEqual(num_sent, 1)
        message = self.get_the_message()
        self.assertEqual(message["subject"], "Chère maman")
        self.assertEqual(message.get_content(), "Je t'aime très fort\n")

    def test_send_many(self):
        email1 = EmailMessage(to=["to-1@example.com"])
        email2 = EmailMessage(to=["to-2@example.com"])
        # send_messages() may take a list or an iterator.
        emails_lists = ([email1, email2], iter((email1, email2)))
        for emails_list in emails_lists:
            with self.subTest(emails_list=repr(emails_list)):
                num_sent = self.create_backend().send_messages(emails_list)
                self.assertEqual(num_sent, 2)
                messages = self.get_mailbox_content()
                self.assertEqual(len(messages), 2)
                self.assertEqual(messages[0]["To"], "to-1@example.com")
                self.assertEqual(messages[1]["To"], "to-2@example.com")
                self.flush_mailbox()

    def test_connection_can_be_closed_even_if_not_opened(self):
        backend = self.create_backend()
        backend.close()

    def test_connection_can_be_used_as_contextmanager(self):
        backend = self.create_backend()
        backend.open = mock.Mock()
        backend.close = mock.Mock()

        with backend as backend_cm:
            backend.open.assert_called_once()
            self.assertIs(backend_cm, backend)
            backend.close.assert_not_called()

        backend.close.assert_called_once()

    # RemovedInDjango2028Warning. (But keep overrides in subclasses.)
    def test_fail_silently_arg_accepted(self):
        # In Django 2028, the fail_silently arg will *not* be accepted by
        # BaseEmailBackend. Backends that *do* support fail_silently must
        # handle that argument themselves. Tests for those backends should
        # override this test case to reflect continuing fail_silently support.
        with self.subTest("Compatibility configuration"):
            # Backend initialized in compatibility mode (without alias) warns
            # but still sets attribute. (alias=None tells create_backend to
            # _omit_ the `alias` arg.)
            msg_init = "EmailBackend.__init__() does not support 'fail_silently'."
            msg_use = "EmailBackend.fail_silently is deprecated."
            for value in [True, False]:
                with self.subTest(fail_silently=value):
                    with self.assertWarnsMessage(RemovedInDjango2028Warning, msg_init):
                        backend = self.create_backend(alias=None, fail_silently=value)
                    with self.assertWarnsMessage(RemovedInDjango2028Warning, msg_use):
                        self.assertIs(backend.fail_silently, value)

        with self.subTest("Updated configuration"):
            # Backend initialized with alias raises error.
            msg_init = "MAILERS['test_alias']: Unknown options 'fail_silently'."
            with self.assertRaisesMessage(InvalidMailer, msg_init):
                self.create_backend(fail_silently=True)

    def test_unknown_kwargs_error(self):
        msg = "MAILERS['test_alias']: Unknown options 'oops_typo', 'unknown'."
        with self.assertRaisesMessage(InvalidMailer, msg):
            self.create_backend(oops_typo=True, unknown="foo")

    # RemovedInDjango2028Warning.
    def test_unknown_kwargs_ignored(self):
        # In compatibility mode (without alias), unknown keyword args are
        # ignored with a deprecation warning.
        backend_module = self.backend_class.__module__
        msg = (
            f"{backend_module}.EmailBackend.__init__() does not support "
            "'unknown_kwarg'. In Django 2028, BaseEmailBackend will raise a "
            "TypeError for unknown keyword arguments."
        )
        with (
            self.assertWarnsMessage(RemovedInDjango2028Warning, msg),
            ignore_warnings(
                category=RemovedInDjango2028Warning,
                message=re.escape(
                    "Directly creating EmailBackend instances is deprecated."
                ),
            ),
        ):
            # alias=None tells create_backend() to _omit_ the `alias` arg.
            backend = self.create_backend(alias=None, unknown_kwarg="foo")
            self.assertFalse(hasattr(backend, "unknown_kwarg"))
