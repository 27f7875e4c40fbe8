# Notifications (issue 5): NOTIFY, e-mail (SMTP via libcurl) and webhook deliveries of
# backfill_completed and collection_failing, against the fake Salesforce org
# (test/fake_salesforce.py) and the notification sink (test/notify_sink.py: an SMTP
# server and a webhook receiver that count every attempt, failed or not).
#
#   0. sync.add_notification's argument checks (22023) and privileges (42501).
#   1. A backfill completes: exactly one e-mail (every recipient; subject, Message-ID,
#      X-Sync-Delivery), one POST (id/event/data, X-Sync-* headers) and one NOTIFY;
#      sync.notifications shows both sent after one attempt; still one of each 5 s later.
#      A column backfill (remove_column + add_column) notifies once more, with "columns".
#   2. Failure then success: the sink fails 2 webhook and 1 SMTP attempts; the outbox
#      shows 'retrying' with last_error, then 'sent'; one successful delivery each,
#      retried after sync.max_backoff (the cap), every attempt under the same delivery id.
#   3. Restarts (with a third, broken webhook target on a closed port all along):
#      deliveries that fail while the server restarts arrive exactly once after it; a
#      delivery in flight when the server is asked to stop (the sink holds its answer
#      4 s), and deliveries sent just before, are not sent again after the restart; the
#      server log never shows the worker terminated while recording a delivery.
#   4. collection_failing: sync.notify_after_failures = 3 (ALTER SYSTEM + reload): one
#      NOTIFY, e-mail and POST when the third consecutive failure happens, none for the
#      4th, 5th, 6th; after recovery a new failing episode notifies once more.
#   5. With every delivery failing, changes in the API still reach the tables.
#   6. After a delivery failed inside libcurl (connection refused) and nothing else is
#      due, SIGTERM still ends the worker.
#   Throughout: every delivery id the sink accepted is a 'sent' outbox row, and each
#   was accepted exactly once.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use IPC::Run;
use JSON::PP;
use MIME::QuotedPrint qw(decode_qp);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
my $dir = "$FindBin::Bin/..";
my $creds = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $MAX_BACKOFF = 2;
my $POLL = 0.1;    # seconds between the checks of wait_until / wait_sql
my @RCPTS = ('ops@example.com', 'oncall@example.org');
my $FROM = 'sync@db.example';
my $OURS = "notification IN ('ops-mail', 'ops-hook')";    # the targets on the sink

# ---------------------------------------------------------------------------
# Helpers: the fake org and the sink (start_fake, admin, sql, wait_sql etc. are in SyncTest.pm)
# ---------------------------------------------------------------------------

my @procs;    # the sink and the listener (the fake is SyncTest's)

END
{
	local $?;    # keep the test's exit status
	for my $p (@procs)
	{
		eval { $p->kill_kill(grace => 3); };
	}
}

sub start_proc
{
	my ($name, $re, @cmd) = @_;
	my $out = '';
	my $log = "$PostgreSQL::Test::Utils::log_path/$name.log";
	my $timeout = IPC::Run::timeout(90);
	my $h = IPC::Run::start(\@cmd, '<', \undef, '>', \$out, '2>', $log, $timeout);
	eval { $h->pump until $out =~ $re; };
	die "$name did not start: $@ $out" unless $out =~ $re;
	$timeout->reset;
	push @procs, $h;
	return ($h, $out);
}

my $FAKE_SF = start_fake('salesforce', 'sf', '--records', '10');
my $FAKE = $FAKE_SF->{url};
my (undef, $sink_out) = start_proc('notify_sink', qr/listening smtp=(\d+) http=(\d+)/,
	'/usr/bin/python3', "$dir/notify_sink.py", '--smtp-port', '0', '--http-port', '0', '--verbose');
$sink_out =~ /listening smtp=(\d+) http=(\d+)/;
my ($SMTP_PORT, $SINK) = ($1, "http://127.0.0.1:$2");
my $HOOK_URL = "$SINK/hooks/sync";

sub fake { return admin($FAKE_SF, @_); }
sub sink { return admin({ url => $SINK }, @_); }

# Every SMTP attempt / webhook request the sink saw (delivered or not).
sub messages { return sink('GET', 'messages'); }
sub posts    { return sink('GET', 'posts'); }

sub header { my ($m, $name) = @_; return $m->{headers}{ lc $name }; }

# Attempts belonging to a collection: e-mails by X-Sync-Delivery (mapped through the
# outbox), posts by their JSON.
sub mails_for
{
	my ($ids, %opt) = @_;    # $ids: hashref delivery id => 1
	return [ grep { defined $_->{data} && $ids->{ header($_, 'X-Sync-Delivery') // '' }
			  && (!defined $opt{delivered} || ($_->{delivered} ? 1 : 0) == $opt{delivered}) } @{ messages() } ];
}

sub posts_for
{
	my ($ids, %opt) = @_;
	return [ grep { $_->{json} && $ids->{ $_->{json}{id} // '' }
			  && (!defined $opt{delivered} || ($_->{delivered} ? 1 : 0) == $opt{delivered}) } @{ posts() } ];
}

# ---------------------------------------------------------------------------
# Helpers: the database
# ---------------------------------------------------------------------------

my $node;

# SQLSTATE of a failing statement (run as $user), or 'ok'.
sub sqlstate
{
	my ($query, $user) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\n$query",
		extra_params => [ $user ? ('-U', $user) : () ]);
	return 'ok' if $ret == 0;
	return $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : "no sqlstate: $err";
}

# Outbox rows of a collection: [{id, notification, kind, event, state, attempts, last_error, payload}]
sub outbox
{
	my ($collection, $event) = @_;
	my $rows = sql(
		"SELECT coalesce(json_agg(json_build_object('id', id, 'notification', notification, 'kind', kind, "
		  . "'event', event, 'state', state, 'attempts', attempts, 'last_error', last_error, 'payload', payload, "
		  . "'sent_at', sent_at, 'created_at', created_at) ORDER BY id), '[]') FROM sync.notifications "
		  . "WHERE payload->>'collection' = '$collection' AND $OURS"
		  . ($event ? " AND event = '$event'" : ''));
	return $json->decode($rows);
}

sub ids_of { my ($rows, $kind) = @_; return { map { ($_->{id} => 1) } grep { $_->{kind} eq $kind } @$rows }; }
sub row_of { my ($rows, $kind) = @_; my @r = grep { $_->{kind} eq $kind } @$rows; return $r[0]; }

# A persistent psql LISTENing on both channels; notifications are collected in @notes.
my ($ls_h, $ls_timer, $ls_in, $ls_out, $ls_err);
my $ls_n = 0;
my @notes;

sub listener_start
{
	($ls_in, $ls_out, $ls_err) = ('', '', '');
	$ls_timer = IPC::Run::timeout(60);
	$ls_h = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-f', '-' ],
		'<', \$ls_in, '>', \$ls_out, '2>', \$ls_err, $ls_timer);
	push @procs, $ls_h;
	listener_poll('LISTEN sync_backfill_completed; LISTEN sync_collection_failing');
}

sub listener_stop
{
	eval { $ls_h->kill_kill(grace => 3); };
	@procs = grep { $_ != $ls_h } @procs;
	$ls_h = undef;
}

# Run a statement in the listening session; psql prints notifications after it.
sub listener_poll
{
	my ($query) = @_;
	my $tag = '__ls_' . ++$ls_n . '__';
	$ls_timer->start(60);
	$ls_in .= ($query // 'SELECT 1') . ";\n\\echo $tag\n";
	$ls_h->pump until $ls_out =~ /\Q$tag\E\n/ || $ls_err ne '';
	die "listener failed: $ls_err" if $ls_err ne '';
	while ($ls_out =~ s/^Asynchronous notification "([^"]+)" with payload "(.*)" received from server process with PID (\d+)\.\n//m)
	{
		push @notes, { channel => $1, payload => $json->decode($2), pid => $3 };
	}
	$ls_out = '';
}

sub notes_for
{
	my ($channel, $collection, $pred) = @_;
	listener_poll();
	return [ grep { $_->{channel} eq $channel && $_->{payload}{collection} eq $collection && (!$pred || $pred->($_)) }
		  @notes ];
}

# Every delivery the sink accepted is a sent outbox row, accepted exactly once, and
# every sent outbox row was accepted by the sink. Each check looks at the deliveries
# created since the previous one, so that one repeat fails one check.
my $checked_upto = 0;

sub check_exactly_once
{
	my ($label) = @_;
	my %sent = (email => [], webhook => []);
	my $upto = sql('SELECT coalesce(max(id), 0) FROM sync.notification_outbox');
	for (split /\n/, sql("SELECT kind, id FROM sync.notifications WHERE state = 'sent' AND id > $checked_upto "
		  . "AND id <= $upto ORDER BY id"))
	{
		my ($k, $id) = split /\|/;
		push @{ $sent{$k} }, $id;
	}
	my $mine = sub { my $id = shift; return $id > $checked_upto && $id <= $upto; };
	my @mail = sort { $a <=> $b } grep { $mine->($_) } map { header($_, 'X-Sync-Delivery') }
	  grep { $_->{delivered} } @{ messages() };
	my @hook = sort { $a <=> $b } grep { $mine->($_) } map { $_->{json}{id} } grep { $_->{delivered} } @{ posts() };
	is(join(',', @mail), join(',', @{ $sent{email} }),
		"$label: each sent e-mail delivery (ids $checked_upto..$upto) reached the sink exactly once");
	is(join(',', @hook), join(',', @{ $sent{webhook} }),
		"$label: each sent webhook delivery (ids $checked_upto..$upto) reached the sink exactly once");
	$checked_upto = $upto;
}

# The spec: sending a delivery and recording it happen with interrupts held, so a
# SIGTERM never ends the worker in between. The server log shows where it ended.
# KNOWN BUG (see the report): an ERROR caught inside the held section (a webhook
# request failing in libcurl) makes errfinish() zero InterruptHoldoffCount, and the
# RESUME_INTERRUPTS() after it wraps the counter to UINT32_MAX: from then on the worker
# holds interrupts between deliveries (SIGTERM ignored, part 6) and does not hold them
# during deliveries (killed while recording one, re-sent after the restart, part 3).
my $log_offset = 0;

sub check_no_kill_while_recording
{
	my ($label) = @_;
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	my $new = substr($log, $log_offset);
	$log_offset = length($log);
	my @kills = $new =~ /(FATAL:  terminating background worker "sync worker" due to administrator command\n[^\n]*CONTEXT:  SQL statement "UPDATE sync\.notification_outbox[^\n]*)/g;
	is(scalar(@kills), 0, "$label: the worker was not terminated while recording a delivery")
	  or diag(join("\n", @kills));
}

sub add_object
{
	my ($name, $records) = @_;
	my $r = fake('POST', 'objects', { name => $name, records => $records });
	die "object $name: " . $json->encode($r) unless $r->{records} == $records;
	return sql("SELECT sync.add_collection('acme', '$name')");
}

sub wait_backfilled
{
	my ($name, $records) = @_;
	ok( wait_sql(90,
			"SELECT backfill_completed_at IS NOT NULL AND backfill_records = $records FROM sync.status "
			  . "WHERE source = 'acme' AND collection = '$name'", $POLL),
		"$name: backfill of $records records completes (" . elapsed() . ')')
	  or diag(sql("SELECT collection, state, phase, backfill_records, last_error FROM sync.status"));
}

sub wait_sent
{
	my ($name, $event, $n, $timeout) = @_;
	my $extra = $event eq 'backfill_completed' ? "event = 'backfill_completed' AND NOT payload ? 'columns'"
	  : "event = '$event'";
	return wait_sql($timeout // 60,
		"SELECT count(*) FILTER (WHERE state = 'sent') = $n AND count(*) = $n FROM sync.notifications "
		  . "WHERE payload->>'collection' = '$name' AND $OURS AND $extra", $POLL);
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

$node = start_node(max_backoff => $MAX_BACKOFF);    # and CREATE EXTENSION sync
sql("SELECT sync.create_source('acme', 'salesforce', '$FAKE', '$creds', "
	  . "'{\"requests_per_second\": 50, \"burst\": 5, \"poll_interval\": 1}')");

# ---------------------------------------------------------------------------
# 0. Arguments and privileges
# ---------------------------------------------------------------------------

my $smtp_opts = qq('{"smtp_url": "smtp://127.0.0.1:$SMTP_PORT", "from": "$FROM"}');
is(sqlstate("SELECT sync.add_notification('x', 'sms', '+15550100')"), '22023', 'unknown kind: 22023');
is(sqlstate("SELECT sync.add_notification('x', NULL, 'http://h/')"), '22023', 'NULL kind: 22023');
is(sqlstate("SELECT sync.add_notification('x', 'webhook', 'ftp://127.0.0.1/x')"), '22023', 'ftp:// webhook URL: 22023');
is(sqlstate("SELECT sync.add_notification('x', 'webhook', 'not a url')"), '22023', 'webhook target that is no URL: 22023');
is(sqlstate("SELECT sync.add_notification('x', 'email', 'not-an-address', $smtp_opts)"), '22023',
	'e-mail target without @: 22023');
is(sqlstate("SELECT sync.add_notification('x', 'email', 'a\@x.test,, b\@y.test', $smtp_opts)"), '22023',
	'e-mail recipients with an empty item: 22023');
is(sqlstate("SELECT sync.add_notification('x', 'email', 'a\@x.test')"), '22023', 'e-mail without smtp_url: 22023');
is(sqlstate(qq{SELECT sync.add_notification('x', 'email', 'a\@x.test', '{"smtp_url": "http://127.0.0.1:25"}')}),
	'22023', 'e-mail with an http:// smtp_url: 22023');
is(sqlstate("SELECT sync.add_notification('x', 'webhook', 'http://127.0.0.1/h', '{}', '{backfill_completed,bogus}')"),
	'22023', 'unknown event: 22023');
is(sqlstate("SELECT sync.add_notification('x', 'webhook', 'http://127.0.0.1/h', '{}', '{}')"), '22023',
	'no events: 22023');
is(sqlstate(qq{SELECT sync.add_notification('x', 'webhook', 'http://127.0.0.1/h', '[1]')}), '22023',
	'options that are no object: 22023');
is(sql('SELECT count(*) FROM sync.notification_targets'), '0', 'no target was created by the failed calls');

sql('CREATE ROLE mallory LOGIN');
for my $rel (qw(sync.notifications sync.notification_targets sync.notification_outbox))
{
	is(sqlstate("SELECT * FROM $rel", 'mallory'), '42501', "an unprivileged role cannot read $rel (42501)");
}
is(sqlstate("SELECT sync.add_notification('m', 'webhook', 'http://127.0.0.1/h')", 'mallory'), '42501',
	'an unprivileged role cannot add a notification (42501)');
is(sqlstate("SELECT sync._emit('backfill_completed', '{}')", 'mallory'), '42501',
	'an unprivileged role cannot emit events (42501)');

# ---------------------------------------------------------------------------
# 1. A backfill completes: one e-mail, one POST, one NOTIFY
# ---------------------------------------------------------------------------

my $mail_target = sql("SELECT sync.add_notification('ops-mail', 'email', '" . join(', ', @RCPTS) . "', $smtp_opts)");
my $hook_target = sql("SELECT sync.add_notification('ops-hook', 'webhook', '$HOOK_URL')");
like($mail_target, qr/^\d+$/, 'add_notification (email) returns an id');
isnt($hook_target, $mail_target, 'add_notification (webhook) returns another id');
is(sqlstate("SELECT sync.add_notification('ops-hook', 'webhook', '$HOOK_URL')"), '23505',
	'a second target with the same name is refused');
listener_start();

my $A = 'Widget_A__c';
my $tableA = add_object($A, 30);
wait_backfilled($A, 30);
ok(wait_sent($A, 'backfill_completed', 2), "$A: both deliveries are sent (" . elapsed() . ')')
  or diag(sql('SELECT * FROM sync.notifications'));
my $rowsA = outbox($A);
is(scalar(@$rowsA), 2, "$A: one outbox row per target");
for my $r (@$rowsA)
{
	is_deeply([ $r->{event}, $r->{state}, $r->{attempts}, $r->{last_error}, $r->{payload}{records},
		$r->{payload}{source}, $r->{payload}{table} ],
		[ 'backfill_completed', 'sent', 1, undef, 30, 'acme', $tableA ],
		"$A: $r->{kind} row is sent after 1 attempt with the right payload");
}
my $mailA = row_of($rowsA, 'email');
my $hookA = row_of($rowsA, 'webhook');
is($mailA->{notification}, 'ops-mail', 'the e-mail row names its target');

sub check_mail
{
	my ($label, $m, $row, $subject) = @_;
	is_deeply([ sort @{ $m->{rcpts} } ], [ sort @RCPTS ], "$label: e-mail to every recipient");
	is($m->{from}, $FROM, "$label: envelope sender is the from option");
	is(header($m, 'From'), $FROM, "$label: From header");
	is(header($m, 'To'), join(', ', @RCPTS), "$label: To header");
	is(header($m, 'Subject'), $subject, "$label: subject");
	like(header($m, 'Message-ID') // '', qr/^<sync-$row->{id}\@[^<>\s]+>$/, "$label: Message-ID names the delivery");
	is(header($m, 'X-Sync-Delivery'), $row->{id}, "$label: X-Sync-Delivery is the delivery id");
	is(header($m, 'X-Sync-Event'), $row->{event}, "$label: X-Sync-Event");
	like(header($m, 'Date') // '', qr/^\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$/, "$label: Date header");
	is_deeply($m->{violations}, [], "$label: the message breaks no SMTP rule the sink checks");
	is(header($m, 'Content-Transfer-Encoding'), 'quoted-printable', "$label: the body is quoted-printable (7-bit)");
	ok(($m->{body} // '') !~ /[^\x00-\x7f]/, "$label: the body on the wire is 7-bit");
	my ($last) = grep { /^\{/ } reverse split /\n/, mail_text($m);
	is_deeply($last ? $json->decode($last) : undef, $row->{payload}, "$label: the body carries the payload JSON");
}

# The text of an e-mail as its reader sees it: quoted-printable decoded, LF line ends.
sub mail_text
{
	my ($m) = @_;
	my $body = $m->{body} // '';
	$body =~ s/\r\n/\n/g;
	$body = decode_qp($body) if (header($m, 'Content-Transfer-Encoding') // '') eq 'quoted-printable';
	return $body;
}

sub check_post
{
	my ($label, $p, $row) = @_;
	is($p->{method} . ' ' . $p->{path}, 'POST /hooks/sync', "$label: POST to the webhook's path");
	like($p->{headers}{'content-type'} // '', qr{^application/json}, "$label: Content-Type JSON");
	is($p->{headers}{'x-sync-event'}, $row->{event}, "$label: X-Sync-Event header");
	is($p->{headers}{'x-sync-delivery'}, $row->{id}, "$label: X-Sync-Delivery header is the delivery id");
	is($p->{json}{id}, $row->{id}, "$label: body id is the delivery id");
	is($p->{json}{event}, $row->{event}, "$label: body event");
	like($p->{json}{created_at} // '', qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/, "$label: body created_at");
	is_deeply($p->{json}{data}, $row->{payload}, "$label: body data is the payload");
}

my $mailsA = mails_for(ids_of($rowsA, 'email'));
my $postsA = posts_for(ids_of($rowsA, 'webhook'));
is(scalar(@$mailsA), 1, "$A: exactly one e-mail attempt");
is(scalar(@$postsA), 1, "$A: exactly one webhook attempt");
ok($mailsA->[0]{delivered} && $postsA->[0]{delivered}, "$A: both were accepted by the sink");
check_mail($A, $mailsA->[0], $mailA, "[sync] acme.$A: backfill completed (30 records)");
like(mail_text($mailsA->[0]), qr/completed: 30 records/, "$A: the e-mail text gives the record count");
check_post($A, $postsA->[0], $hookA);
is_deeply([ @{ $postsA->[0]{json}{data} }{qw(source collection table records)} ], [ 'acme', $A, $tableA, 30 ],
	"$A: webhook data has source, collection, table, records");

ok(wait_until(30, sub { @{ notes_for('sync_backfill_completed', $A) } >= 1 }, $POLL), "$A: NOTIFY sync_backfill_completed seen");
my $notesA = notes_for('sync_backfill_completed', $A);
is(scalar(@$notesA), 1, "$A: exactly one NOTIFY");
is_deeply($notesA->[0]{payload}, $hookA->{payload}, "$A: the NOTIFY payload is the delivered payload");

sleep 5;
is(scalar(@{ mails_for(ids_of($rowsA, 'email')) }), 1, "$A: 5 s later still one e-mail");
is(scalar(@{ posts_for(ids_of($rowsA, 'webhook')) }), 1, "$A: 5 s later still one POST");
is(scalar(@{ notes_for('sync_backfill_completed', $A) }), 1, "$A: 5 s later still one NOTIFY");
is(sql("SELECT count(*) || '/' || sum(attempts) FROM sync.notifications WHERE payload->>'collection' = '$A'"),
	'2/2', "$A: 5 s later still two outbox rows of one attempt each");

# A column backfill notifies too, with "columns". Dropping a column starts none (its
# field is only no longer fetched), so it must not notify.
my $notes_col = sql("SELECT column_name FROM sync.columns WHERE source = 'acme' AND collection = '$A' AND api_field = 'Notes__c'");
is($notes_col, 'notes__c', 'Notes__c is synced into notes__c');
sql("SELECT sync.remove_column('acme', '$A', 'notes__c')");
is(sql("SELECT sync.add_column('acme', '$A', 'Notes__c')"), 'notes__c', 'add_column starts a column backfill');
my $notes_only = "payload->'columns' = '[\"Notes__c\"]'";
ok(wait_sql(60, "SELECT count(*) = 2 AND bool_and(state = 'sent') FROM sync.notifications "
		  . "WHERE payload->>'collection' = '$A' AND $notes_only", $POLL),
	"$A: the column backfill's deliveries are sent (" . elapsed() . ')')
  or diag(sql("SELECT * FROM sync.notifications"));
my $rowsC = [ grep { $_->{payload}{columns} && $json->encode($_->{payload}{columns}) eq '["Notes__c"]' } @{ outbox($A) } ];
is_deeply([ map { $_->{payload}{records} } @$rowsC ], [ 30, 30 ], 'column backfill payload counts 30 records');
my $mc = mails_for(ids_of($rowsC, 'email'));
my $pc = posts_for(ids_of($rowsC, 'webhook'));
is(scalar(@$mc) . '/' . scalar(@$pc), '1/1', 'column backfill: one e-mail and one POST');
check_mail('column backfill', $mc->[0], row_of($rowsC, 'email'), "[sync] acme.$A: backfill completed (30 records)");
check_post('column backfill', $pc->[0], row_of($rowsC, 'webhook'));
my $col_note = sub { $json->encode($_[0]{payload}{columns} // []) eq '["Notes__c"]' };
ok(wait_until(30, sub { @{ notes_for('sync_backfill_completed', $A, $col_note) } >= 1 }, $POLL), 'column backfill: NOTIFY seen');
is(scalar(@{ notes_for('sync_backfill_completed', $A, $col_note) }), 1, 'column backfill: exactly one NOTIFY');
# KNOWN BUG (see the report): the first ALTER TABLE of a synced table "retypes" every
# timestamptz column (collection_columns says 'timestamptz', format_type() says
# 'timestamp with time zone'), so DROP COLUMN starts a column backfill of CreatedDate,
# LastModifiedDate, SystemModstamp and mails/posts/NOTIFYs its completion.
my @spurious = grep { $_->{payload}{columns} && !$col_note->($_) } @{ outbox($A) };
is(join(' ', map { "$_->{kind}:" . $json->encode($_->{payload}{columns}) } @spurious), '',
	'remove_column (DROP COLUMN) notifies no backfill');
check_exactly_once('after part 1');

# ---------------------------------------------------------------------------
# 2. Failure, then success
# ---------------------------------------------------------------------------

sink('POST', 'faults', { target => 'webhook', count => 2, http_status => 500 });
sink('POST', 'faults', { target => 'smtp', count => 1, smtp_code => 451 });
my $B = 'Widget_B__c';
add_object($B, 20);
wait_backfilled($B, 20);

# catch each row between its failed attempt and its next one
my (%retrying);
ok( wait_until(60,
		sub {
			for my $r (@{ outbox($B) })
			{
				$retrying{ $r->{kind} } //= $r if $r->{state} eq 'retrying';
			}
			return keys(%retrying) == 2;
		}, $POLL),
	"$B: both deliveries are seen 'retrying' (" . elapsed() . ')');
is($retrying{webhook}{last_error}, 'the webhook answered HTTP 500', "$B: webhook last_error while retrying");
like($retrying{email}{last_error} // '', qr/^SMTP delivery through 127\.0\.0\.1:$SMTP_PORT failed \(server reply 451\): /,
	"$B: e-mail last_error names the server and its 451 reply");
note "e-mail last_error after a 451: " . ($retrying{email}{last_error} // 'none');
ok(wait_sent($B, 'backfill_completed', 2), "$B: both are sent in the end (" . elapsed() . ')')
  or diag(sql("SELECT * FROM sync.notifications WHERE payload->>'collection' = '$B'"));
my $rowsB = outbox($B);
is(row_of($rowsB, 'webhook')->{attempts}, 3, "$B: webhook sent on the 3rd attempt");
is(row_of($rowsB, 'email')->{attempts}, 2, "$B: e-mail sent on the 2nd attempt");
my $pB = posts_for(ids_of($rowsB, 'webhook'));
my $mB = mails_for(ids_of($rowsB, 'email'));
is(join(',', map { $_->{status} } @$pB), '500,500,200', "$B: the sink answered the webhook 500, 500, then 200");
is(join(',', map { $_->{reply} } @$mB), '451,250', "$B: the sink answered the e-mail 451, then 250");
is(scalar(grep { $_->{delivered} } @$pB) . '/' . scalar(grep { $_->{delivered} } @$mB), '1/1',
	"$B: exactly one successful delivery of each");
check_post($B, (grep { $_->{delivered} } @$pB)[0], row_of($rowsB, 'webhook'));
check_mail($B, (grep { $_->{delivered} } @$mB)[0], row_of($rowsB, 'email'), "[sync] acme.$B: backfill completed (20 records)");
# retries after 5 s, 10 s, ... capped at sync.max_backoff (2 s here)
my @gaps = map { $pB->[$_]{t} - $pB->[ $_ - 1 ]{t} } 1 .. $#$pB;
note sprintf('webhook retry gaps: %s s', join(', ', map { sprintf('%.2f', $_) } @gaps));
ok($gaps[0] >= $MAX_BACKOFF - 0.5, "$B: the webhook retry waited its backoff (gap $gaps[0] s)");
ok($gaps[1] < 8, "$B: the backoff is capped by sync.max_backoff (second gap $gaps[1] s, uncapped 10 s)");
is(scalar(@{ notes_for('sync_backfill_completed', $B) }), 1, "$B: failed deliveries do not repeat the NOTIFY");
check_exactly_once('after part 2');

# ---------------------------------------------------------------------------
# 3. Restarts
# ---------------------------------------------------------------------------

# A third target whose host refuses connections, from here to the end of part 3: a
# broken target among good ones. Its attempts fail inside libcurl (an ERROR the
# worker catches), again every sync.max_backoff seconds.
sub closed_port
{
	require IO::Socket::INET;
	my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0) or die "socket: $!";
	my $p = $s->sockport;
	close $s;
	return $p;
}
sql("SELECT sync.add_notification('dead-hook', 'webhook', 'http://127.0.0.1:" . closed_port() . "/x')");

# 3a. The sink is unreachable while the backfill completes and the server restarts
sink('POST', 'faults', { target => 'webhook', count => 100000, drop => JSON::PP::true });
sink('POST', 'faults', { target => 'smtp', count => 100000, drop => JSON::PP::true, stage => 'connect' });
my $C = 'Widget_C__c';
add_object($C, 10);
wait_backfilled($C, 10);
ok(wait_sql(60, "SELECT count(*) = 2 AND bool_and(state = 'retrying') FROM sync.notifications "
		  . "WHERE payload->>'collection' = '$C' AND $OURS", $POLL),
	"$C: both deliveries fail while the sink drops connections (" . elapsed() . ')');
is(scalar(@{ notes_for('sync_backfill_completed', $C) }), 1, "$C: one NOTIFY");
listener_stop();
$node->restart;
sink('DELETE', 'faults');
my $t_restart = time;
ok(wait_sent($C, 'backfill_completed', 2, 90), "$C: both are delivered after the restart (" . elapsed() . ')')
  or diag(sql("SELECT * FROM sync.notifications WHERE payload->>'collection' = '$C'"));
my $rowsCc = outbox($C);
my $mCc = mails_for(ids_of($rowsCc, 'email'), delivered => 1);
my $pCc = posts_for(ids_of($rowsCc, 'webhook'), delivered => 1);
is(scalar(@$mCc) . '/' . scalar(@$pCc), '1/1', "$C: exactly one e-mail and one POST arrived");
ok($mCc->[0]{t} >= $t_restart && $pCc->[0]{t} >= $t_restart, "$C: they arrived after the restart");
my $failed_posts = scalar(@{ posts_for(ids_of($rowsCc, 'webhook'), delivered => 0) });
ok($failed_posts >= 1, "$C: the sink saw $failed_posts failed webhook attempts before");
ok(row_of($rowsCc, 'webhook')->{attempts} >= 2 && row_of($rowsCc, 'email')->{attempts} >= 2,
	"$C: the outbox counts the failed attempts and the successful one");
check_no_kill_while_recording('first restart');
check_post($C, $pCc->[0], row_of($rowsCc, 'webhook'));
check_mail($C, $mCc->[0], row_of($rowsCc, 'email'), "[sync] acme.$C: backfill completed (10 records)");

# 3b. The server is asked to stop while a delivery is in flight (the sink holds its
# answer for 4 s): it is sent and recorded once; deliveries sent just before the
# restart (3a's) are not sent again.
sink('POST', 'faults', { target => 'webhook', count => 1, delay => 4 });
sink('POST', 'faults', { target => 'smtp', count => 1, delay => 4 });
my $D = 'Widget_D__c';
add_object($D, 10);
my $inflight;
ok( wait_until(90,
		sub {
			my $s = sink('GET', 'stats');
			$inflight = $s->{smtp_inflight} ? 'email' : $s->{webhook_inflight} ? 'webhook' : undef;
			return $inflight;
		}, $POLL),
	"$D: a delivery is in flight (" . elapsed() . ')');
$inflight //= 'none';
note "restarting while the $inflight delivery of $D is in flight";
$node->restart;
ok(wait_sql(60, 'SELECT sync.worker_pid() IS NOT NULL', $POLL), 'the worker is back after the restart');
wait_backfilled($D, 10);
ok(wait_sent($D, 'backfill_completed', 2, 90), "$D: both deliveries are sent (" . elapsed() . ')')
  or diag(sql("SELECT * FROM sync.notifications WHERE payload->>'collection' = '$D'"));
sleep 5;
my $rowsD = outbox($D);
my $mD = mails_for(ids_of($rowsD, 'email'));
my $pD = posts_for(ids_of($rowsD, 'webhook'));
is(scalar(@$mD) . '/' . scalar(@$pD), '1/1', "$D: 5 s after the restart, exactly one e-mail and one POST (no repeat)");
ok($mD->[0]{delivered} && $pD->[0]{delivered}, "$D: both accepted");
is(row_of($rowsD, $inflight)->{attempts}, 1, "$D: the in-flight $inflight delivery was recorded once, after one attempt")
  if $inflight ne 'none';
is(scalar(@{ mails_for(ids_of($rowsCc, 'email'), delivered => 1) }) . '/'
	  . scalar(@{ posts_for(ids_of($rowsCc, 'webhook'), delivered => 1) }),
	'1/1', "$C: deliveries sent before the second restart are not sent again");
check_no_kill_while_recording('second restart');
check_exactly_once('after the restarts');
like(sql("SELECT string_agg(DISTINCT last_error, '; ') FROM sync.notifications WHERE notification = 'dead-hook'"),
	qr/^request to "127\.0\.0\.1" failed: .*connect/i, 'the dead target\'s last_error says the connection failed');
sql("SELECT sync.drop_notification('dead-hook')");
is(sql("SELECT count(*) FROM sync.notification_outbox o WHERE NOT EXISTS "
		  . "(SELECT 1 FROM sync.notification_targets t WHERE t.id = o.target_id)"), '0',
	'drop_notification removes its pending deliveries');
is(sqlstate("SELECT sync.drop_notification('dead-hook')"), '42704', 'dropping it again: 42704');

# ---------------------------------------------------------------------------
# 4. collection_failing
# ---------------------------------------------------------------------------

listener_start();
sql('ALTER SYSTEM SET sync.notify_after_failures = 3');
sql('SELECT pg_reload_conf()');
ok(wait_sql(30, "SELECT current_setting('sync.notify_after_failures') = '3'", $POLL), 'notify_after_failures reloaded');
my $E = 'Widget_E__c';
my $tableE = add_object($E, 10);
wait_backfilled($E, 10);
ok(wait_sent($E, 'backfill_completed', 2), "$E: backfill deliveries sent");
sleep 2;    # the worker saw the reload well before the failures start

sub failing_episode
{
	my ($n) = @_;
	my $t0 = time;
	fake('POST', 'faults', { path_regex => $E, status => 500, count => 100000 });
	ok(wait_sql(90, "SELECT consecutive_failures >= 6 FROM sync.status WHERE collection = '$E'", $POLL),
		"$E episode $n: 6 consecutive failures (" . elapsed() . ')')
	  or diag(sql("SELECT collection, state, consecutive_failures, last_error FROM sync.status"));
	ok(wait_sent($E, 'collection_failing', 2 * $n), "$E episode $n: failing deliveries sent")
	  or diag(sql("SELECT * FROM sync.notifications WHERE event = 'collection_failing'"));
	my $rows = outbox($E, 'collection_failing');
	is(scalar(@$rows), 2 * $n, "$E episode $n: one collection_failing row per target and episode, not one per failure");
	my @new = @$rows[ -2, -1 ];
	is_deeply([ map { $_->{payload}{consecutive_failures} } @new ], [ 3, 3 ],
		"$E episode $n: payload says 3 consecutive failures");
	like($new[0]{payload}{error} // '', qr/HTTP 500/, "$E episode $n: payload carries the error");
	is_deeply([ @{ $new[0]{payload} }{qw(source collection table)} ], [ 'acme', $E, $tableE ],
		"$E episode $n: payload names source, collection, table");
	my $m = mails_for(ids_of($rows, 'email'));
	my $p = posts_for(ids_of($rows, 'webhook'));
	is(scalar(@$m) . '/' . scalar(@$p), "$n/$n", "$E episode $n: $n e-mail(s) and $n POST(s) in all");
	check_mail("$E episode $n", $m->[-1], row_of([ $new[0], $new[1] ], 'email'), "[sync] acme.$E is failing");
	like(mail_text($m->[-1]), qr/has failed 3 times in a row/, "$E episode $n: e-mail text says how often it failed");
	check_post("$E episode $n", $p->[-1], row_of([ $new[0], $new[1] ], 'webhook'));
	my $notes = notes_for('sync_collection_failing', $E);
	is(scalar(@$notes), $n, "$E episode $n: $n NOTIFY sync_collection_failing in all");
	is($notes->[-1]{payload}{consecutive_failures}, 3, "$E episode $n: NOTIFY payload says 3 failures");
	is_deeply($notes->[-1]{payload}, $new[0]{payload}, "$E episode $n: NOTIFY payload is the delivered payload");
	# recovery
	fake('DELETE', 'faults');
	ok(wait_sql(60, "SELECT consecutive_failures = 0 AND state = 'syncing' FROM sync.status WHERE collection = '$E'", $POLL),
		"$E episode $n: recovers (" . elapsed() . ')');
}

failing_episode(1);
failing_episode(2);
is(scalar(@{ [ grep { $_->{channel} eq 'sync_collection_failing' } @notes ] }), 2,
	'no collection_failing NOTIFY for any other collection');
check_exactly_once('after part 4');

# ---------------------------------------------------------------------------
# 5. Every delivery failing does not stop the sync
# ---------------------------------------------------------------------------

sink('POST', 'faults', { target => 'webhook', count => 100000, http_status => 503 });
sink('POST', 'faults', { target => 'smtp', count => 100000, smtp_code => 554 });
my $F = 'Widget_F__c';
my $tableF = add_object($F, 10);
wait_backfilled($F, 10);
ok(wait_sql(60, "SELECT count(*) = 2 AND min(attempts) >= 2 AND bool_and(state = 'retrying') FROM sync.notifications "
		  . "WHERE payload->>'collection' = '$F'", $POLL),
	"$F: deliveries keep failing (" . elapsed() . ')');
my @changes = ([ $A, $tableA ], [ $F, $tableF ]);
for my $c (@changes)
{
	my ($obj, $table) = @$c;
	my $id = fake('GET', "records/$obj")->[0]{Id};
	fake('PATCH', "records/$obj/$id", { Name => "changed-$obj" });
	push @$c, $id;
}
for my $c (@changes)
{
	my ($obj, $table, $id) = @$c;
	ok(wait_sql(60, "SELECT name = 'changed-$obj' FROM $table WHERE id = '$id'", $POLL),
		"$obj: a change arrives while every delivery fails (" . elapsed() . ')');
}
my $attemptsF = sql("SELECT min(attempts) FROM sync.notifications WHERE payload->>'collection' = '$F'");
ok(wait_sql(30, "SELECT min(attempts) > $attemptsF AND bool_and(state = 'retrying') FROM sync.notifications "
		  . "WHERE payload->>'collection' = '$F'", $POLL),
	"$F: the deliveries are still retried meanwhile");
is(sql("SELECT count(*) FROM sync.status WHERE source = 'acme' AND (state <> 'syncing' OR consecutive_failures > 0)"),
	'0', 'no collection fails because deliveries fail');
sink('DELETE', 'faults');
ok(wait_sent($F, 'backfill_completed', 2), "$F: delivered once the sink accepts again (" . elapsed() . ')');
is(scalar(@{ mails_for(ids_of(outbox($F), 'email'), delivered => 1) }) . '/'
	  . scalar(@{ posts_for(ids_of(outbox($F), 'webhook'), delivered => 1) }),
	'1/1', "$F: exactly one e-mail and one POST accepted");
check_exactly_once('after part 5');

# ---------------------------------------------------------------------------
# 6. A delivery that failed with a connection error leaves the worker stoppable
# ---------------------------------------------------------------------------

# A webhook whose host refuses connections fails inside libcurl (an ERROR the worker
# catches); once its target is dropped nothing is due, and SIGTERM must still end the
# worker (it holds interrupts only while it sends and records a delivery).
sql("SELECT sync.add_notification('dead-hook', 'webhook', 'http://127.0.0.1:" . closed_port() . "/x')");
my $G = 'Widget_G__c';
add_object($G, 5);
wait_backfilled($G, 5);
ok(wait_sql(60, "SELECT count(*) = 1 AND bool_and(state = 'retrying' AND attempts >= 1) FROM sync.notifications "
		  . "WHERE notification = 'dead-hook'", $POLL),
	"$G: the delivery to a closed port fails (" . elapsed() . ')');
ok(wait_sent($G, 'backfill_completed', 2), "$G: the other targets' deliveries are sent");
sql("SELECT sync.drop_notification('dead-hook')");
sleep 1;    # the worker may be between its due check and the delivery
my $old_pid = sql('SELECT sync.worker_pid()');
is(sql("SELECT pg_terminate_backend($old_pid)"), 't', 'SIGTERM sent to the worker');
my $exited = wait_sql(20, "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $old_pid)", $POLL);
ok($exited, 'the worker exits on SIGTERM after a failed delivery (within 20 s)')
  or diag('worker still running: ' . sql("SELECT pid, backend_type, state, wait_event FROM pg_stat_activity WHERE pid = $old_pid"));
SKIP:
{
	skip 'the old worker is still running', 1 unless $exited;
	ok(wait_sql(30, "SELECT sync.worker_pid() IS NOT NULL AND sync.worker_pid() <> $old_pid", $POLL), 'a new worker starts');
}
check_exactly_once('at the end');
is(sql("SELECT count(*) FROM sync.notifications WHERE state <> 'sent'"), '0', 'every delivery is sent in the end');

listener_stop();
note 'runtime ' . elapsed();
done_testing();
