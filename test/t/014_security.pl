# Issue 6, "Secrets": credentials are readable only by the extension's owner (or a
# privileged role); an unprivileged role reads the status views but never a token or a
# secret; tokens never reach the server log, error messages or pg_stat_activity;
# configuring sources needs privilege; only http(s) URLs; redirects are not followed;
# TLS verification stays on unless a source turns it off (and a superuser allows it);
# the extension's functions are safe against search_path tricks. Secrets are looked for
# in everything alice can SELECT in schema sync, in the NOTIFY payloads she can LISTEN to
# (sync.notify_after_failures = 1 here), in pg_stat_activity and in the server log.
# Assertions named "BUG if failing" expose a hole when they fail.
#
# What "logged" means here: the test runs with log_min_messages = debug1 and the default
# log_statement = none. A caller's own statement text is the caller's business: with
# log_statement = all, or when the statement fails (log_min_error_statement = error, the
# default), the server logs it, credentials included -- so no statement of this suite
# that carries a marker is allowed to fail, and failing calls use throw-away credentials.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use SyncTest;

use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $json = JSON::PP->new->utf8->canonical;

# Unique marker strings: none of them may ever be readable by alice, or show up in the
# server log, an error message or pg_stat_activity.
my $CS         = 'SECRET-MARKER-CS-4711';            # client_secret
my $RT         = 'SECRET-MARKER-RT-4712';            # refresh_token
my $RT_REVOKED = 'SECRET-MARKER-RT-REVOKED-4713';    # a refresh token the API refuses
my $AT_TRUNC   = 'SECRET-MARKER-AT-4714';            # access token in a truncated token response
my $AT_FILE    = 'SECRET-MARKER-AT-4715';            # access token sent with a file:// instance_url
my $ECHO       = 'SECRET-MARKER-ECHO-4717';          # only in a body the token endpoint echoes
my $SK         = 'sk_test_SECRETMARKERSK4718abcdef';        # a Stripe secret key
my @markers = ($CS, $RT, $RT_REVOKED, $AT_TRUNC, $AT_FILE, 'SECRETMARKERSK4718');
# Access tokens of the fake: the org id's 15 characters, "!", then 96 token characters.
my $token_re = qr/00DHp0000001SfK![A-Za-z0-9._]{8,}/;

my %known_tokens;    # every access token the fake issued to us (read from sync.source_secrets)
my @activity;        # every pg_stat_activity row sampled while the worker ran (JSON text)

my $F = start_fake('salesforce', 'sec', '--records', 300, '--accounts', 30,
	'--client-id', 'marker-client', '--client-secret', $CS, '--refresh-token', $RT);
my $S = start_fake('stripe', 'sec', '--customers', 40, '--deleted-customers', 0, '--rate-limit', 0,
	'--endpoint-rate-limit', 0, '--api-key', $SK);
my $node = start_node(max_backoff => 2);
# The TAP clusters log every statement (log_statement = all); the default is none.
$node->append_conf('postgresql.conf', "log_min_messages = debug1\nlog_statement = none\nsync.notify_after_failures = 1\n");
$node->reload;
sql("CREATE ROLE alice LOGIN");
my $good_creds = $json->encode({ client_id => 'marker-client', client_secret => $CS, refresh_token => $RT });

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# psql as $user (default: the superuser) with SQLSTATEs in messages: (ret, stdout, stderr)
sub psql_as
{
	my ($user, $q) = @_;
	my @extra = $user ? ('-U', $user) : ();
	my ($ret, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\n$q",
		extra_params => \@extra, on_error_stop => 1);
	return ($ret, $out, $err);
}

sub sqlstate_of
{
	my ($err) = @_;
	return $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : 'none';
}

# SQLSTATE and message of a statement expected to fail
sub fails
{
	my ($user, $q) = @_;
	my ($ret, $out, $err) = psql_as($user, $q);
	return ('none', "succeeded: $out") if $ret == 0;
	my ($msg) = $err =~ /ERROR:\s+[0-9A-Z]{5}:\s+(.*)/;
	return (sqlstate_of($err), $msg // $err);
}

sub secrets_in
{
	my ($text) = @_;
	my @hits = grep { index($text, $_) >= 0 } @markers;
	push @hits, "access token $1" if $text =~ /($token_re)/;
	for my $t (keys %known_tokens)
	{
		push @hits, 'a known access token' if index($text, $t) >= 0;
	}
	return @hits;
}

# Remember the current access token and sample every other session's pg_stat_activity row.
sub sample
{
	my $tok = sql("SELECT ss.token->>'access_token' FROM sync.source_secrets ss WHERE ss.token IS NOT NULL");
	$known_tokens{$_} = 1 for grep { $_ ne '' } split /\n/, $tok;
	push @activity, sql("SELECT coalesce(json_agg(row_to_json(a)), '[]') FROM pg_stat_activity a "
		  . "WHERE pid <> pg_backend_pid()");
}

sub wait_sampling
{
	my ($timeout, $query) = @_;
	return wait_until($timeout, sub { sample(); sql($query) eq 't' }, 0.3);
}

# Every relation of schema sync, and whether alice may read it.
sub relations
{
	my %r;
	for (split /\n/, sql("SELECT format('%s|%s|%s', c.relname, c.relkind, "
		. "has_table_privilege('alice', c.oid, 'SELECT')) FROM pg_class c "
		. "WHERE c.relnamespace = 'sync'::regnamespace AND c.relkind IN ('r','v','m','p','f','S') ORDER BY 1"))
	{
		my ($name, $kind, $can) = split /\|/;
		$r{$name} = { kind => $kind, select => $can eq 't' };
	}
	return \%r;
}

# Everything alice can read in schema sync, as she reads it: "relation: row json" lines.
sub alice_dump
{
	my $rels = relations();
	my @readable = grep { $rels->{$_}{select} && $rels->{$_}{kind} ne 'S' } sort keys %$rels;
	my $q = join("\nUNION ALL\n",
		map { "SELECT '$_: ' || row_to_json(t)::text FROM sync.\"$_\" t" } @readable);
	my ($ret, $out, $err) = psql_as('alice', $q . ";\nSELECT 'budgets fn: ' || row_to_json(b)::text FROM sync._budgets() b");
	die "alice could not read the readable relations: $err" if $ret != 0;
	return $out;
}

sub check_alice_sees_nothing
{
	my ($when) = @_;
	my $dump = alice_dump();
	my @hits = secrets_in($dump);
	is(join(', ', @hits), '', "BUG if failing: $when: nothing alice can read in schema sync holds a secret or token");
	if (@hits)
	{
		diag "lines alice can read with a secret:";
		diag $_ for grep { secrets_in($_) } split /\n/, $dump;
	}
	return $dump;
}

sub status_json
{
	my ($source) = @_;
	return row("SELECT state, consecutive_failures, last_error, last_error_at, waiting_on, last_poll_at "
		  . "FROM sync.status WHERE source = " . lit($source));
}

# helper HTTP servers (redirector, TLS proxy)
my $helper_py = "$PostgreSQL::Test::Utils::tmp_check/sec_helper.py";
my @helpers;
END
{
	local $?;
	eval { $_->{h}->kill_kill(grace => 2) } for @helpers;
}

sub start_helper
{
	my ($name, @args) = @_;
	my $out = '';
	my $log = "$PostgreSQL::Test::Utils::log_path/sec_helper_$name.log";
	my $h = IPC::Run::start([ '/usr/bin/python3', $helper_py, @args ], '<', \undef, '>', \$out, '2>', $log,
		IPC::Run::timeout(60));
	eval { $h->pump until $out =~ /listening on (\d+)/; };
	die "helper $name did not start: $@ $out" unless $out =~ /listening on (\d+)/;
	my $helper = { h => $h, port => $1, log => $log };
	push @helpers, $helper;
	return $helper;
}

open my $fh, '>', $helper_py or die;
print $fh <<'PY';
import http.server, ssl, sys, urllib.request, urllib.error

mode = sys.argv[1]          # redirect LOCATION | tlsproxy CERT KEY UPSTREAM


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.command, self.path))
        sys.stderr.flush()

    def any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", sys.argv[2])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        req = urllib.request.Request(sys.argv[4] + self.path, data=body, method=self.command)
        for k in ("Content-Type", "Authorization", "Accept", "Sforce-Query-Options"):
            if self.headers.get(k):
                req.add_header(k, self.headers.get(k))
        try:
            resp = urllib.request.urlopen(req, timeout=30)
            status, data, headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as e:
            status, data, headers = e.code, e.read(), e.headers
        self.send_response(status)
        self.send_header("Content-Type", headers.get("Content-Type") or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = any


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
if mode == "tlsproxy":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("listening on %d" % srv.server_address[1], flush=True)
srv.serve_forever()
PY
close $fh;

# ---------------------------------------------------------------------------
# 1. Catalog privileges: which relations PUBLIC reads
# ---------------------------------------------------------------------------

my $rels = relations();
my @readable = sort grep { $rels->{$_}{select} } keys %$rels;
my @closed = sort grep { !$rels->{$_}{select} } keys %$rels;
note "relations of schema sync alice can read: @readable";
note "relations of schema sync alice cannot read: @closed";
is(join(' ', @readable),
	join(' ', sort qw(_cycles available_fields budgets collection_columns collection_state collections
		  columns sources stat_collections stat_sources status webhooks)),
	'alice can read exactly the configuration tables and status views (not secrets, outbox, api_fields, rejected values)');
ok(!$rels->{$_}{select}, "alice cannot read sync.$_")
  for qw(source_secrets notification_targets notification_outbox notifications rejected rejected_values);
is(sql("SELECT string_agg(format('%s:%s', c.relname, p.priv), ', ' ORDER BY c.relname, p.priv) FROM pg_class c, "
	  . "unnest(ARRAY['INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) p(priv) "
	  . "WHERE c.relnamespace = 'sync'::regnamespace AND c.relkind IN ('r','v','m','p','f') "
	  . "AND has_table_privilege('alice', c.oid, p.priv)"), '',
	'alice has no write (or trigger/references) privilege on any relation of schema sync');
is(sql("SELECT string_agg(c.relname::text, ', ') FROM pg_class c WHERE c.relnamespace = 'sync'::regnamespace "
	  . "AND c.relkind = 'S' AND (has_sequence_privilege('alice', c.oid, 'USAGE') "
	  . "OR has_sequence_privilege('alice', c.oid, 'UPDATE'))"), '',
	'alice can use no sequence of schema sync');
is(sql("SELECT count(*) FROM pg_attribute a WHERE a.attrelid = 'sync.source_secrets'::regclass AND a.attnum > 0 "
	  . "AND has_column_privilege('alice', a.attrelid, a.attnum, 'SELECT')"), '0',
	'no column of sync.source_secrets is readable by alice (no column grant either)');

for my $t (qw(source_secrets notification_targets notification_outbox))
{
	is(sql("SELECT string_agg(format('%s:%s', a.grantee::regrole, a.privilege_type), ',') FROM pg_class c, "
		  . "aclexplode(c.relacl) a WHERE c.oid = 'sync.$t'::regclass AND a.grantee <> c.relowner"), '',
		"sync.$t grants nothing to anyone but its owner");
}
is(sql("SELECT c.relowner::regrole::text = e.extowner::regrole::text FROM pg_class c, pg_extension e "
	  . "WHERE c.oid = 'sync.source_secrets'::regclass AND e.extname = 'sync'"), 't',
	'sync.source_secrets belongs to the role that created the extension');

# ---------------------------------------------------------------------------
# 2. Functions: who may execute them, SECURITY DEFINER, pinned search_path
# ---------------------------------------------------------------------------

my %fn;
for (split /\n/, sql("SELECT format('%s|%s|%s|%s|%s', p.oid::regprocedure, has_function_privilege('alice', p.oid, 'EXECUTE'), "
	  . "l.lanname, p.prosecdef, coalesce(array_to_string(p.proconfig, ';'), '')) "
	  . "FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.pronamespace = 'sync'::regnamespace"))
{
	my ($sig, $exec, $lang, $secdef, $config) = split /\|/, $_, 5;
	my ($name) = $sig =~ /^sync\.(\w+)\(/;
	$fn{$name} = { sig => $sig, exec => $exec eq 't', lang => $lang, secdef => $secdef eq 't', config => $config };
}
note "functions of schema sync: " . scalar(keys %fn);
my @public_exec = sort grep { $fn{$_}{exec} } keys %fn;
note "executable by PUBLIC: @public_exec";
# Read-only (or harmless) functions only: status helpers, waiting, naming, the trigger
# functions (which cannot be called directly) and _wake/_register_database (a wake-up of
# this database's worker, which runs only what the owner configured).
is(join(' ', @public_exec),
	join(' ', sort qw(_assignable _budgets _collection_id _convert_for _identifier _on_alter_table
		  _register_database _require_admin _source_id _wait_for_state _wake _wake_trigger
		  wait_for_backfill worker_pid)),
	'PUBLIC can execute exactly the read-only functions of schema sync');
is(join(' ', sort grep { $fn{$_}{secdef} } keys %fn), '', 'no function of schema sync is SECURITY DEFINER');
my @unpinned_sql = sort grep { $fn{$_}{lang} ne 'c' && $fn{$_}{config} !~ /^search_path=pg_catalog, pg_temp$/ } keys %fn;
is(join(' ', @unpinned_sql), '', 'every SQL/plpgsql function of schema sync has SET search_path = pg_catalog, pg_temp');
my @unpinned_c = sort grep { $fn{$_}{lang} eq 'c' && $fn{$_}{config} eq '' } keys %fn;
note "C functions without a pinned search_path: @unpinned_c";
# These run no SQL (shared memory, latches, naming; _assignable parses type names and is
# only called by _convert_for, which pins search_path). A new C function that runs SPI
# must pin it: this list is checked so that it gets reviewed.
is(join(' ', @unpinned_c),
	join(' ', sort qw(_assignable _budget_clear_penalty _budget_forget _budget_reset_stats _budgets
		  _identifier _register_database _wake _wake_trigger worker_pid)),
	'C functions without a pinned search_path are exactly the ones that run no SQL');

# ---------------------------------------------------------------------------
# 3. URLs: only absolute http(s) with a host (base_url, login_url, token_url)
# ---------------------------------------------------------------------------

my $plain = q('{"client_id": "x", "client_secret": "y", "refresh_token": "z"}');
my @bad_urls = ('file:///etc/passwd', 'ftp://127.0.0.1/x', 'gopher://127.0.0.1:70/_x', 'dict://127.0.0.1:11211/stat',
	'ldap://127.0.0.1/dc=x', 'scp://127.0.0.1/etc/passwd', 'javascript:alert(1)', '/services/data', 'example.com/x',
	'http://', 'https://', "http://127.0.0.1/\r\nX-Injected: 1", 'http://127.0.0.1 /x', '');
my $n_bad = 0;
for my $u (@bad_urls)
{
	$n_bad++;
	my ($state, $msg) = fails(undef, "SELECT sync.create_source('badurl$n_bad', 'salesforce', " . lit($u) . ", $plain)");
	my $shown = $u =~ s/\r\n/\\r\\n/r;
	is($state, '22023', "create_source refuses base_url '$shown' with 22023 ($msg)");
}
is(sql("SELECT count(*) FROM sync.sources WHERE name LIKE 'badurl%'"), '0', 'no source was created with a bad URL');
sql("SELECT sync.drop_source(name) FROM sync.sources WHERE name LIKE 'badurl%'");

my ($state, $msg) = fails(undef,
	"SELECT sync.create_source('badlogin', 'salesforce', '$F->{url}', $plain, '{\"login_url\": \"file:///etc/passwd\"}')");
is($state, '22023', "create_source refuses login_url file:///etc/passwd ($msg)");
($state, $msg) = fails(undef,
	"SELECT sync.create_source('badlogin', 'salesforce', '$F->{url}', $plain, '{\"login_url\": \"gopher://127.0.0.1/\"}')");
is($state, '22023', "create_source refuses login_url gopher:// ($msg)");
($state, $msg) = fails(undef,
	"SELECT sync.create_source('badtok', 'airtable', '$F->{url}', '{\"client_id\": \"x\", \"refresh_token\": \"y\"}', "
	  . "'{\"base_id\": \"appABCDEFGHIJKLMN\", \"token_url\": \"ftp://127.0.0.1/token\"}')");
is($state, '22023', "create_source refuses an airtable token_url ftp:// ($msg)");
($state, $msg) = fails(undef,
	"SELECT sync.create_source('badtok', 'airtable', '$F->{url}', '{\"client_id\": \"x\", \"refresh_token\": \"y\"}', "
	  . "'{\"base_id\": \"appABCDEFGHIJKLMN\", \"token_url\": \"/oauth2/v1/token\"}')");
is($state, '22023', "create_source refuses a relative airtable token_url ($msg)");
($state, $msg) = fails(undef,
	"SELECT sync.add_notification('badhook', 'webhook', 'file:///etc/passwd')");
is($state, '22023', "add_notification refuses a file:// webhook ($msg)");

# The main source, with the marker credentials (this statement succeeds: it is not logged).
sql("SELECT sync.create_source('acme', 'salesforce', '$F->{url}', " . lit($good_creds)
	  . ", '{\"requests_per_second\": 20, \"burst\": 5, \"poll_interval\": 1}')");
for my $u ('file:///etc/passwd', 'gopher://127.0.0.1:70/', 'javascript:alert(1)', '//127.0.0.1/x', 'http://')
{
	($state, $msg) = fails(undef, "SELECT sync.alter_source('acme', base_url => " . lit($u) . ")");
	is($state, '22023', "alter_source refuses base_url '$u' ($msg)");
}
for my $u ('file:///etc/passwd', 'dict://127.0.0.1:11211/', 'token')
{
	($state, $msg) = fails(undef, "SELECT sync.alter_source('acme', options => " . lit($json->encode({ login_url => $u })) . ")");
	is($state, '22023', "alter_source refuses login_url '$u' ($msg)");
}
is(sql("SELECT base_url || ' ' || coalesce(options->>'login_url', '-') FROM sync.sources WHERE name = 'acme'"),
	"$F->{url} -", 'the refused changes left the source as it was');

# A password in the URL would be readable by everyone in sync.sources.base_url. (This
# marker is not one of @markers: refusing the URL makes the error, and the failed
# statement, name it in the log -- the caller's own text.)
my $UI = 'SECRET-MARKER-UI-4716';
($state, $msg) = fails(undef, "SELECT sync.create_source('userinfo', 'salesforce', "
	  . lit("http://admin:$UI\@127.0.0.1:1") . ", $plain)");
is($state, '22023', 'BUG if failing: create_source refuses a base_url with a user name and password '
	  . '(sync.sources.base_url is readable by PUBLIC)');
sql("SELECT sync.drop_source('userinfo')") if $state eq 'none';

# ---------------------------------------------------------------------------
# 4. An unprivileged role cannot configure anything
# ---------------------------------------------------------------------------

sql("SELECT sync.add_collection('acme', 'Contact')");
ok(wait_sampling(120, "SELECT backfill_completed_at IS NOT NULL FROM sync.status WHERE source = 'acme'"),
	'acme.contact backfilled') or diag explain status_of('acme', 'Contact');
is(sql("SELECT count(*) FROM acme.contact"), '300', 'all 300 contacts are in the table');
sample();
ok(scalar(keys %known_tokens) >= 1 && (keys %known_tokens)[0] =~ /^$token_re$/,
	'the worker holds an access token of the fake (the token pattern the scans look for)');

my $alice_creds = q('{"client_id": "a", "client_secret": "ALICE-NOT-SECRET", "refresh_token": "b"}');
my @denied = (
	[ create_source     => "SELECT sync.create_source('evil', 'salesforce', '$F->{url}', $alice_creds)" ],
	[ alter_source      => "SELECT sync.alter_source('acme', base_url => 'http://127.0.0.1:9')" ],
	[ alter_source_creds => "SELECT sync.alter_source('acme', credentials => $alice_creds)" ],
	[ drop_source       => "SELECT sync.drop_source('acme', true)" ],
	[ add_collection    => "SELECT sync.add_collection('acme', 'Account')" ],
	[ remove_collection => "SELECT sync.remove_collection('acme', 'Contact', true)" ],
	[ pause             => "SELECT sync.pause('acme')" ],
	[ resume            => "SELECT sync.resume('acme')" ],
	[ _set_paused       => "SELECT sync._set_paused('acme', NULL, true)" ],
	[ resync            => "SELECT sync.resync('acme', 'Contact')" ],
	[ run_now           => "SELECT sync.run_now('acme')" ],
	[ reconcile         => "SELECT sync.reconcile('acme', 'Contact')" ],
	[ reset_stats       => "SELECT sync.reset_stats()" ],
	[ add_column        => "SELECT sync.add_column('acme', 'Contact', 'Title')" ],
	[ alter_column      => "SELECT sync.alter_column('acme', 'Contact', 'email', 'varchar(3)')" ],
	[ remove_column     => "SELECT sync.remove_column('acme', 'Contact', 'email')" ],
	[ add_notification  => "SELECT sync.add_notification('n', 'webhook', 'http://127.0.0.1:9/')" ],
	[ drop_notification => "SELECT sync.drop_notification('n')" ],
	[ _describe         => "SELECT * FROM sync._describe('acme', 'Contact')" ],
	[ _validate_source  => "SELECT sync._validate_source('salesforce', '$F->{url}', $alice_creds, '{}')" ],
	[ _budget_forget    => "SELECT sync._budget_forget(1)" ],
	[ _budget_clear_penalty => "SELECT sync._budget_clear_penalty(1)" ],
	[ _budget_reset_stats => "SELECT sync._budget_reset_stats(1)" ],
	[ _start_column_backfill => "SELECT sync._start_column_backfill(1, '{Title}')" ],
	[ _emit             => "SELECT sync._emit('collection_failing', '{}')" ],
	[ read_secrets      => "SELECT * FROM sync.source_secrets" ],
	[ read_targets      => "SELECT * FROM sync.notification_targets" ],
	[ read_rejected     => "SELECT * FROM sync.rejected" ],
	[ update_sources    => "UPDATE sync.sources SET base_url = 'http://127.0.0.1:9'" ],
	[ update_state      => "UPDATE sync.collection_state SET run_requested = true" ],
	[ insert_secrets    => "INSERT INTO sync.source_secrets VALUES (99, '{}')" ],
	[ alter_table       => "ALTER TABLE acme.contact ADD COLUMN title text" ],
	[ read_synced_table => "SELECT * FROM acme.contact" ],
	[ allow_insecure_tls => "SET sync.allow_insecure_tls = on" ],
	[ show_insecure_tls => "SHOW sync.allow_insecure_tls" ],
);
for my $d (@denied)
{
	my ($what, $q) = @$d;
	($state, $msg) = fails('alice', $q);
	is($state, '42501', "alice: $what is denied ($msg)");
}
is(sql("SELECT base_url || ' ' || paused || ' ' || (SELECT count(*) FROM sync.collections) || ' ' || "
	  . "(SELECT ss.credentials->>'client_secret' FROM sync.source_secrets ss WHERE ss.source_id = s.id) "
	  . "FROM sync.sources s WHERE name = 'acme'"),
	"$F->{url} false 1 $CS", "alice's attempts changed nothing (URL, paused, collections, credentials)");

# What alice may do: read the status views and wait.
my ($ret, $out, $err) = psql_as('alice',
	"SELECT source || '/' || collection || '/' || state FROM sync.status;\n"
	  . "SELECT count(*) FROM sync.columns WHERE source = 'acme';\n"
	  . "SELECT count(*) FROM sync.available_fields WHERE source = 'acme';\n"
	  . "SELECT count(*) FROM sync.budgets; SELECT count(*) FROM sync.stat_sources; SELECT count(*) FROM sync.stat_collections;\n"
	  . "SELECT sync.wait_for_backfill('acme', 'Contact', '1 s');\n"
	  . "SELECT sync.worker_pid() = (SELECT pid FROM pg_stat_activity WHERE application_name = 'sync worker');");
is($ret, 0, 'alice reads sync.status, columns, available_fields, budgets, stat_* and calls wait_for_backfill/worker_pid')
  or diag $err;
my @lines = split /\n/, $out;
is($lines[0], 'acme/Contact/syncing', 'alice sees the collection in sync.status');
ok($lines[1] > 5 && $lines[2] >= $lines[1], "alice sees the column map ($lines[1] columns, $lines[2] fields)");
is(join(',', @lines[ 3 .. 7 ]), '1,1,1,t,t', 'alice sees budgets and statistics, waits, and finds the worker');
check_alice_sees_nothing('after the backfill');

# alice listens to the events sync broadcasts (anyone may LISTEN).
my $listener = $node->background_psql('postgres', extra_params => [ '-U', 'alice' ], on_error_stop => 1);
$listener->query_safe('LISTEN sync_collection_failing');
$listener->query_safe('LISTEN sync_backfill_completed');

# ---------------------------------------------------------------------------
# 5. Tokens through refreshes, 401s, revoked and failing token endpoints
# ---------------------------------------------------------------------------

sub failed_since
{
	my ($t0, $like, $unlike) = @_;
	# last_error stays after the next good poll (which may come a second later)
	return "SELECT last_error_at > '$t0' AND last_error ~ " . lit($like)
	  . ($unlike ? " AND last_error !~ " . lit($unlike) : '')
	  . " FROM sync.status WHERE source = 'acme'";
}

# Run a configuration change; returns now() of its transaction (before its commit, so
# before any error the worker records because of it).
sub changed_at
{
	my ($q) = @_;
	my @out = grep { $_ ne '' } split /\n/, sql("BEGIN; $q; SELECT now(); COMMIT;");
	return $out[-1];
}

sub recovered_since
{
	my ($t0) = @_;
	return "SELECT consecutive_failures = 0 AND last_poll_at > '$t0' AND "
	  . "(SELECT token IS NOT NULL FROM sync.source_secrets ss JOIN sync.sources s ON s.id = ss.source_id "
	  . " WHERE s.name = 'acme') FROM sync.status WHERE source = 'acme'";
}

my %errors_seen;    # last_error texts, by scenario

# 5a. An expired session: 401 -> refresh -> a new token.
my @before = keys %known_tokens;
admin($F, 'POST', 'expire_tokens');
ok(wait_sampling(60, "SELECT ss.token->>'access_token' NOT IN (" . join(',', map { lit($_) } @before)
	  . ") FROM sync.source_secrets ss JOIN sync.sources s ON s.id = ss.source_id WHERE s.name = 'acme'"),
	'an expired session is refreshed: a new access token');
sample();
my $t2 = sql("SELECT ss.token->>'access_token' FROM sync.source_secrets ss JOIN sync.sources s ON s.id = ss.source_id "
	  . "WHERE s.name = 'acme'");
ok(scalar(keys %known_tokens) >= 2, 'two access tokens seen (' . scalar(keys %known_tokens) . ')');

# 5b. A 401 whose body echoes the token that was sent (twice: the retry after a refresh fails too).
my $t0 = sql('SELECT now()');
admin($F, 'POST', 'faults', { path_regex => 'query', status => 401, count => 2,
	body => [ { message => "Session expired or invalid: Bearer $t2", errorCode => 'INVALID_SESSION_ID' } ] });
ok(wait_sampling(60, failed_since($t0, 'INVALID_SESSION_ID')), '401 twice: the collection failed')
  or diag explain status_json('acme');
$errors_seen{'401 echoing the token'} = status_json('acme')->{last_error};
check_alice_sees_nothing('a 401 echoing the token');
ok(wait_sampling(60, recovered_since($t0)), 'the next poll after the 401s succeeds') or diag explain status_json('acme');

# 5c. A revoked refresh token: invalid_grant.
$t0 = changed_at("SELECT sync.alter_source('acme', credentials => "
	  . lit($json->encode({ client_id => 'marker-client', client_secret => $CS, refresh_token => $RT_REVOKED })) . ")");
ok(wait_sampling(60, failed_since($t0, 'invalid_grant')), 'a revoked refresh token: invalid_grant in sync.status')
  or diag explain status_json('acme');
my $st = status_json('acme');
$errors_seen{'revoked refresh token'} = $st->{last_error};
is($st->{waiting_on}, 'token refresh: retry after an error', 'waiting_on names the token refresh');
like($st->{last_error}, qr/^Salesforce token refresh failed with HTTP 400 invalid_grant/, 'last_error is clear');
check_alice_sees_nothing('a revoked refresh token');

# 5d. A token endpoint failing with a body that echoes the request (secrets included).
admin($F, 'POST', 'faults', { path_regex => 'oauth2/token', status => 400, count => 3,
	body => { error => 'invalid_grant', error_description =>
		"$ECHO: grant_type=refresh_token&client_id=marker-client&client_secret=$CS&refresh_token=$RT rejected" } });
$t0 = changed_at("SELECT sync.alter_source('acme', credentials => " . lit($good_creds) . ")");
ok(wait_sampling(60, failed_since($t0, 'token refresh', 'expired access/refresh token')), 'a token endpoint echoing the request: the collection is in error')
  or diag explain status_json('acme');
$errors_seen{'token endpoint echoing the request'} = status_json('acme')->{last_error};
check_alice_sees_nothing('a token endpoint echoing the request');
ok(admin($F, 'GET', 'faults')->[0]{hits} >= 1, 'control: the token endpoint did answer with the echoing body');
admin($F, 'DELETE', 'faults');
# the worker's retries must be over before the next phase's fault is installed
$t0 = sql('SELECT now()');
ok(wait_sampling(60, recovered_since($t0)), 'the collection recovers') or diag explain status_json('acme');

# 5e. A token response cut off in the middle of the access token (200, malformed JSON).
admin($F, 'POST', 'faults', { path_regex => 'oauth2/token', status => 200, count => 1,
	body => qq({"access_token": "$AT_TRUNC-0123456789abcdef) });
$t0 = changed_at("SELECT sync.alter_source('acme', credentials => " . lit($good_creds) . ")");
ok(wait_sampling(60, failed_since($t0, 'malformed JSON|token response')),
	'a truncated token response: the collection is in error') or diag explain status_json('acme');
$errors_seen{'truncated token response'} = status_json('acme')->{last_error};
check_alice_sees_nothing('a truncated token response');
admin($F, 'DELETE', 'faults');
# the worker's retries must be over before the next phase's fault is installed
$t0 = sql('SELECT now()');
ok(wait_sampling(60, recovered_since($t0)), 'the collection recovers') or diag explain status_json('acme');

# 5e'. A token response with a broken escape inside the access token (200, malformed JSON).
admin($F, 'POST', 'faults', { path_regex => 'oauth2/token', status => 200, count => 1,
	body => qq({"access_token": "$AT_TRUNC-fedcba9876543210\\q", "instance_url": "$F->{url}"}) });
$t0 = changed_at("SELECT sync.alter_source('acme', credentials => " . lit($good_creds) . ")");
ok(wait_sampling(60, failed_since($t0, 'malformed JSON|token response')),
	'a token response with a broken escape: the collection is in error') or diag explain status_json('acme');
$errors_seen{'token response with a broken escape'} = status_json('acme')->{last_error};
check_alice_sees_nothing('a token response with a broken escape');
admin($F, 'DELETE', 'faults');
# the worker's retries must be over before the next phase's fault is installed
$t0 = sql('SELECT now()');
ok(wait_sampling(60, recovered_since($t0)), 'the collection recovers') or diag explain status_json('acme');

# 5f. A token response naming a file:// instance: no request leaves for it.
admin($F, 'POST', 'faults', { path_regex => 'oauth2/token', status => 200, count => 1,
	body => { access_token => $AT_FILE, instance_url => 'file:///etc/passwd', token_type => 'Bearer' } });
$t0 = changed_at("SELECT sync.alter_source('acme', credentials => " . lit($good_creds) . ")");
ok(wait_sampling(60, failed_since($t0, 'http and https')),
	'a file:// instance_url from the token endpoint is refused') or diag explain status_json('acme');
$st = status_json('acme');
$errors_seen{'file:// instance_url'} = $st->{last_error};
unlike($st->{last_error}, qr/root:|etc\/passwd/, 'nothing of /etc/passwd (nor its path) in last_error');
check_alice_sees_nothing('a file:// instance_url');
admin($F, 'DELETE', 'faults');

# recovery
$t0 = sql('SELECT now()');
sql("SELECT sync.alter_source('acme', credentials => " . lit($good_creds) . ")");
ok(wait_sampling(60, recovered_since($t0)), 'good credentials again: the collection recovers')
  or diag explain status_json('acme');
sample();


# 5g. Stripe: a static secret key. The API's own 401 masks the key; a body echoing it in full.
sql("SELECT sync.create_source('bill', 'stripe', '$S->{url}', " . lit($json->encode({ secret_key => $SK }))
	  . ", '{\"requests_per_second\": 20, \"poll_interval\": 1}')");
sql("SELECT sync.add_collection('bill', 'customers')");
ok(wait_sampling(90, "SELECT backfill_completed_at IS NOT NULL FROM sync.status WHERE source = 'bill'"),
	'bill.customers backfilled') or diag explain status_json('bill');
$t0 = sql('SELECT now()');
admin($S, 'POST', 'faults', { path_regex => 'v1/events', status => 401, count => 1,
	body => { error => { type => 'invalid_request_error', message => "Invalid API Key provided: $SK" } } });
ok(wait_sampling(60, "SELECT last_error_at > '$t0' AND last_error ~ 'HTTP 401' FROM sync.status WHERE source = 'bill'"),
	'a Stripe 401 echoing the key: the collection failed') or diag explain status_json('bill');
$errors_seen{'Stripe 401 echoing the secret key'} = status_json('bill')->{last_error};
check_alice_sees_nothing('a Stripe 401 echoing the key');
$t0 = sql('SELECT now()');
admin($S, 'DELETE', "keys/$SK");
ok(wait_sampling(60, "SELECT last_error_at > '$t0' AND last_error ~ 'Invalid API Key provided: sk_test_\\*+cdef' "
	  . "FROM sync.status WHERE source = 'bill'"),
	'a revoked Stripe key: 401 with the key masked by the API') or diag explain status_json('bill');
$errors_seen{'revoked Stripe key'} = status_json('bill')->{last_error};
check_alice_sees_nothing('a revoked Stripe key');
sql("SELECT sync.pause('bill')");

for my $what (sort keys %errors_seen)
{
	my $e = $errors_seen{$what} // '';
	my @hits = secrets_in($e);
	is(join(', ', @hits), '', "BUG if failing: last_error after '$what' holds no secret or token")
	  or diag "last_error: $e";
}

my $heard = $listener->query_safe('SELECT 1');
$listener->quit;
my @heard = grep { /Asynchronous notification/ } split /\n/, $heard;
ok(scalar(grep { /sync_collection_failing/ } @heard) >= 3,
	'control: alice heard ' . scalar(@heard) . ' NOTIFY payloads of failing collections');
my %heard_hits;
$heard_hits{$_}++ for map { secrets_in($_) } @heard;
is(join(', ', sort keys %heard_hits), '', 'BUG if failing: no NOTIFY payload alice can LISTEN to holds a secret or token');

# pg_stat_activity: as sampled by a superuser throughout, and as alice sees the worker.
my @act_hits = map { secrets_in($_) } @activity;
ok(scalar(@activity) >= 10, scalar(@activity) . ' pg_stat_activity samples taken while the worker worked');
is(join(', ', @act_hits), '', 'no pg_stat_activity row (any column, any process) showed a secret or token');
($ret, $out, $err) = psql_as('alice',
	"SELECT coalesce(query, '') || '|' || coalesce(application_name, '') FROM pg_stat_activity WHERE application_name = 'sync worker'");
is($out, '<insufficient privilege>|sync worker', 'alice sees the worker but not its activity');
is(join(', ', secrets_in(sql("SELECT string_agg(row_to_json(a)::text, ' ') FROM pg_stat_activity a "
	  . "WHERE backend_type IN ('sync worker', 'sync launcher')"))), '', 'the worker\'s activity holds no secret');

# ---------------------------------------------------------------------------
# 6. Redirects are not followed (not to file://, not to another host)
# ---------------------------------------------------------------------------

sql("SELECT sync.pause('acme')");
my $R1 = start_helper('redirect_file', 'redirect', 'file:///etc/passwd');
my $R2 = start_helper('redirect_host', 'redirect', "$F->{url}/services/oauth2/token");
sql("SELECT sync.create_source('redir1', 'salesforce', 'http://127.0.0.1:$R1->{port}', " . lit($good_creds) . ")");
sql("SELECT sync.create_source('redir2', 'salesforce', 'http://127.0.0.1:$R2->{port}', " . lit($good_creds) . ")");
admin($F, 'DELETE', 'requests');
($state, $msg) = fails(undef, "SELECT sync.add_collection('redir1', 'Contact')");
isnt($state, 'none', "a token endpoint redirecting to file:///etc/passwd: add_collection fails ($state $msg)");
like($msg, qr/HTTP 302/, 'the error names the 302 answer (the redirect was not followed)');
unlike($msg, qr/root:/, 'nothing of /etc/passwd was read');
($state, $msg) = fails(undef, "SELECT sync.add_collection('redir2', 'Contact')");
like($msg, qr/HTTP 302/, "a token endpoint redirecting to another host: add_collection fails with the 302 ($msg)");
is(scalar(grep { $_->{path} =~ m{oauth2/token} } @{ admin($F, 'GET', 'requests') }), 0,
	'the redirect to the other host was not followed (the fake saw no token request)');
like(slurp_file($R2->{log}), qr{^POST /services/oauth2/token}m, 'the redirector did get the token request');
sql("SELECT sync.drop_source('redir1'); SELECT sync.drop_source('redir2')");
sql("SELECT sync.resume('acme')");

# ---------------------------------------------------------------------------
# 7. TLS: verification on unless a source turns it off and a superuser allows it
# ---------------------------------------------------------------------------

my $certdir = "$PostgreSQL::Test::Utils::tmp_check/tls";
mkdir $certdir;
my ($ossl_out, $ossl_err) = ('', '');
my $have_openssl = IPC::Run::run([ 'openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1',
	'-days', '1', '-keyout', "$certdir/key.pem", '-out', "$certdir/cert.pem" ], '>', \$ossl_out, '2>', \$ossl_err);
SKIP:
{
	skip "openssl could not make a certificate: $ossl_err", 12 unless $have_openssl;
	my $T = start_helper('tlsproxy', 'tlsproxy', "$certdir/cert.pem", "$certdir/key.pem", $F->{url});
	my $https = "https://127.0.0.1:$T->{port}";

	# The source is new in this transaction: the backend itself makes the token request.
	($state, $msg) = fails(undef, "BEGIN; SELECT sync.create_source('tls0', 'salesforce', '$https', "
		  . lit($good_creds) . "); SELECT sync.add_collection('tls0', 'Account'); COMMIT;");
	is($state, '08006', "https with a self-signed certificate: add_collection fails with 08006 ($msg)");
	like($msg, qr/certificate/i, 'the error names the certificate problem');

	($state, $msg) = fails(undef, "SELECT sync.create_source('tls0', 'salesforce', '$https', $plain, '{\"verify_tls\": false}')");
	is($state, '42501', "verify_tls = false is refused without sync.allow_insecure_tls ($msg)");

	# Even when the superuser allows insecure TLS, a source without verify_tls = false verifies.
	($state, $msg) = fails(undef, "SET sync.allow_insecure_tls = on; BEGIN; SELECT sync.create_source('tls1', 'salesforce', "
		  . "'$https', " . lit($good_creds) . "); SELECT sync.add_collection('tls1', 'Account'); COMMIT;");
	like($msg, qr/certificate/i, "allow_insecure_tls alone does not turn verification off ($state $msg)");

	# A working source moved to the https proxy: the worker's error is in sync.status.
	sql("SELECT sync.create_source('tlsrc', 'salesforce', '$F->{url}', " . lit($good_creds)
		  . ", '{\"requests_per_second\": 20, \"poll_interval\": 1}')");
	sql("SELECT sync.add_collection('tlsrc', 'Account')");
	ok(wait_sql(90, "SELECT backfill_completed_at IS NOT NULL FROM sync.status WHERE source = 'tlsrc'"),
		'tlsrc.account backfilled over http');
	my $tt = sql('SELECT now()');
	sql("SELECT sync.alter_source('tlsrc', base_url => '$https')");
	ok(wait_sql(60, "SELECT consecutive_failures > 0 AND last_error_at > '$tt' FROM sync.status WHERE source = 'tlsrc'"),
		'the worker fails to refresh the token over https with a self-signed certificate');
	my $ts = row("SELECT state, last_error FROM sync.status WHERE source = 'tlsrc'");
	is($ts->{state}, 'error', 'sync.status: state error');
	like($ts->{last_error}, qr/^request to "127\.0\.0\.1" failed: .*certificate/i, "sync.status names the TLS error ($ts->{last_error})");

	($state, $msg) = fails(undef, "SELECT sync.alter_source('tlsrc', options => '{\"verify_tls\": false}')");
	is($state, '42501', "alter_source to verify_tls = false is refused without sync.allow_insecure_tls ($msg)");

	# Allowed in the caller's session only: the worker (server setting off) still verifies.
	# (alter_source sets consecutive_failures to 0: two failures later, one surely used the new options)
	$tt = sql('SELECT now()');
	sql("SET sync.allow_insecure_tls = on; SELECT sync.alter_source('tlsrc', options => '{\"verify_tls\": false}')");
	is(sql("SELECT options->>'verify_tls' FROM sync.sources WHERE name = 'tlsrc'"), 'false', 'the source says verify_tls = false');
	ok(wait_sql(60, "SELECT consecutive_failures >= 2 AND last_error_at > '$tt' AND last_error ~* 'certificate' "
		  . "FROM sync.status WHERE source = 'tlsrc'"),
		'verify_tls = false set in a session that allowed it: the worker (server setting off) still verifies');

	# Allowed for the server: the worker skips verification for this source only.
	$tt = sql('SELECT now()');
	sql("ALTER SYSTEM SET sync.allow_insecure_tls = on; SELECT pg_reload_conf()");
	sql("SELECT sync.run_now('tlsrc')");
	ok(wait_sql(60, "SELECT consecutive_failures = 0 AND last_poll_at > '$tt' FROM sync.status WHERE source = 'tlsrc'"),
		'with sync.allow_insecure_tls on for the server, the source that turned verification off works')
	  or diag explain row("SELECT * FROM sync.status WHERE source = 'tlsrc'");
	sql("ALTER SYSTEM RESET sync.allow_insecure_tls; SELECT pg_reload_conf()");
	sql("SELECT sync.drop_source('tlsrc', true)");
}

# ---------------------------------------------------------------------------
# 8. search_path tricks
# ---------------------------------------------------------------------------

# alice gets CREATE on public (as before PostgreSQL 15) and a schema of her own, and
# plants functions, operators and tables named like the ones sync uses.
sql("GRANT CREATE ON SCHEMA public TO alice; CREATE SCHEMA alice AUTHORIZATION alice");
my @traps = (
	[ 'lower(text)', 'text', 'pg_catalog.lower($1)' ],
	[ 'upper(text)', 'text', 'pg_catalog.upper($1)' ],
	[ 'length(text)', 'integer', 'pg_catalog.length($1)' ],
	[ 'quote_ident(text)', 'text', 'pg_catalog.quote_ident($1)' ],
	[ 'format(text)', 'text', '$1' ],
	[ 'format(text, text)', 'text', 'pg_catalog.format($1, $2)' ],
	[ 'format(text, text, text)', 'text', 'pg_catalog.format($1, $2, $3)' ],
	[ 'format(text, regclass, text, text)', 'text', 'pg_catalog.format($1, $2, $3, $4)' ],
	[ 'has_table_privilege(text, text)', 'boolean', 'true' ],
	[ 'to_regclass(text)', 'regclass', 'pg_catalog.to_regclass($1)' ],
	[ 'to_regnamespace(text)', 'regnamespace', 'pg_catalog.to_regnamespace($1)' ],
	[ 'jsonb_typeof(jsonb)', 'text', 'pg_catalog.jsonb_typeof($1)' ],
	[ 'jsonb_strip_nulls(jsonb)', 'jsonb', 'pg_catalog.jsonb_strip_nulls($1)' ],
	[ 'pg_notify(text, text)', 'void', 'pg_catalog.pg_notify($1, $2)' ],
	[ 'string_to_array(text, text)', 'text[]', 'pg_catalog.string_to_array($1, $2)' ],
	[ 'array_to_string(text[], text)', 'text', 'pg_catalog.array_to_string($1, $2)' ],
	[ 'cardinality(text[])', 'integer', 'pg_catalog.cardinality($1)' ],
	[ 'now()', 'timestamptz', 'pg_catalog.now()' ],
	[ 'format_type(oid, integer)', 'text', 'pg_catalog.format_type($1, $2)' ],
	[ 'jsonb_build_object(text, text)', 'jsonb', 'pg_catalog.jsonb_build_object($1, $2)' ],
	[ 'to_jsonb(text[])', 'jsonb', 'pg_catalog.to_jsonb($1)' ],
	[ 'textcat(text, text)', 'text', 'pg_catalog.textcat($1, $2)' ],
	[ 'texteq(text, text)', 'boolean', 'pg_catalog.texteq($1, $2)' ],
	[ 'textregexeq(text, text)', 'boolean', 'pg_catalog.textregexeq($1, $2)' ],
	[ 'int4eq(integer, integer)', 'boolean', 'pg_catalog.int4eq($1, $2)' ],
	[ 'jsonb_concat(jsonb, jsonb)', 'jsonb', 'pg_catalog.jsonb_concat($1, $2)' ],
	[ 'jsonb_exists(jsonb, text)', 'boolean', 'pg_catalog.jsonb_exists($1, $2)' ],
	[ 'jsonb_object_field_text(jsonb, text)', 'text', 'pg_catalog.jsonb_object_field_text($1, $2)' ],
);
my $plant = "CREATE TABLE public.trap_log (fn text, by_user text, at timestamptz DEFAULT pg_catalog.now());\n"
  . "GRANT INSERT, SELECT ON public.trap_log TO PUBLIC;\n"
  . "CREATE FUNCTION public.trap_trigger() RETURNS trigger LANGUAGE plpgsql AS \$f\$ BEGIN "
  . "INSERT INTO public.trap_log (fn, by_user) VALUES ('trigger on ' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, "
  . "pg_catalog.current_user()); RETURN NULL; END \$f\$;\n";
for my $schema ('public', 'alice')
{
	for my $t (@traps)
	{
		my ($sig, $ret, $body) = @$t;
		my ($name, $args) = $sig =~ /^(\w+)\((.*)\)$/;
		my $i = 0;
		my $params = join(', ', map { 'a' . ++$i . " $_" } grep { $_ ne '' } split /,\s*/, $args);
		$body =~ s/\$(\d)/a$1/g;
		$plant .= "CREATE FUNCTION $schema.$name($params) RETURNS $ret LANGUAGE plpgsql AS \$f\$ BEGIN "
		  . "INSERT INTO public.trap_log (fn, by_user) VALUES ('$schema.$name', pg_catalog.current_user()); "
		  . "RAISE WARNING 'TRAP % ran', '$schema.$name'; "
		  . ($ret eq 'void' ? "PERFORM $body; RETURN; " : "RETURN $body; ") . "END \$f\$;\n";
	}
	# operators sync's SQL uses, with the exact argument types of pg_catalog's
	$plant .= "CREATE OPERATOR $schema.= (LEFTARG = text, RIGHTARG = text, FUNCTION = $schema.texteq);\n"
	  . "CREATE OPERATOR $schema.~ (LEFTARG = text, RIGHTARG = text, FUNCTION = $schema.textregexeq);\n"
	  . "CREATE OPERATOR $schema.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = $schema.textcat);\n"
	  . "CREATE OPERATOR $schema.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = $schema.int4eq);\n"
	  . "CREATE OPERATOR $schema.|| (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = $schema.jsonb_concat);\n"
	  . "CREATE OPERATOR $schema.? (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = $schema.jsonb_exists);\n"
	  . "CREATE OPERATOR $schema.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = $schema.jsonb_object_field_text);\n";
	# tables named like sync's (and like add_collection's temp table), with a trap trigger
	for my $tbl (qw(sources source_secrets collections collection_columns collection_state api_fields _sync_described))
	{
		$plant .= "CREATE TABLE $schema.$tbl (LIKE sync.collection_columns);\n" if $tbl eq '_sync_described';
		$plant .= "CREATE TABLE $schema.$tbl (id integer, name text, source_id integer, collection_id integer);\n"
		  if $tbl ne '_sync_described';
		$plant .= "CREATE TRIGGER trap BEFORE INSERT OR UPDATE OR DELETE ON $schema.$tbl FOR EACH STATEMENT "
		  . "EXECUTE FUNCTION public.trap_trigger();\n";
		$plant .= "GRANT ALL ON $schema.$tbl TO PUBLIC;\n";
	}
}
($ret, $out, $err) = psql_as('alice', $plant);
is($ret, 0, 'alice planted ' . scalar(@traps) * 2 . ' trap functions, 14 operators and 14 tables in public and her schema')
  or diag $err;

# Positive control: the traps do fire for a statement that resolves names through alice's schemas.
my $hostile_path = 'SET search_path = pg_temp, alice, public, pg_catalog;';
($ret, $out, $err) = psql_as(undef, "$hostile_path SELECT lower('X'); SELECT 'a'::text = 'a'::text;");
is(sql("SELECT string_agg(fn, ',' ORDER BY fn) FROM public.trap_log"), 'alice.lower,alice.texteq',
	'control: a superuser statement of its own with that search_path runs alice\'s lower() and = (text, text)');
sql("TRUNCATE public.trap_log");

# The superuser, with pg_temp and alice's schemas first (even before pg_catalog) and temp tables named
# like sync's, uses every function of the extension and fires its event trigger.
my $session = "$hostile_path
CREATE TEMP TABLE sources (LIKE sync.sources);
CREATE TEMP TABLE source_secrets (LIKE sync.source_secrets);
CREATE TEMP TABLE collections (LIKE sync.collections);
CREATE TEMP TABLE collection_state (LIKE sync.collection_state);
SELECT sync.create_source('trap', 'salesforce', '$F->{url}', " . lit($good_creds) . ", '{\"requests_per_second\": 20, \"poll_interval\": 1}');
SELECT sync.alter_source('trap', options => '{\"burst\": 4}');
SELECT sync.add_collection('trap', 'Account', '{\"fields\": [\"Id\", \"Name\", \"SystemModstamp\"]}');
SELECT sync.wait_for_backfill('trap', 'Account', '90 s');
ALTER TABLE trap.account ADD COLUMN industry pg_catalog.text;
ALTER TABLE trap.account RENAME COLUMN industry TO sector;
ALTER TABLE trap.account ADD COLUMN not_a_field pg_catalog.int4;
SELECT sync.add_column('trap', 'Account', 'Phone');
SELECT sync.alter_column('trap', 'Account', 'phone', 'pg_catalog.varchar(40)');
SELECT sync.remove_column('trap', 'Account', 'phone');
ALTER TABLE trap.account DROP COLUMN sector;
SELECT sync.pause('trap'); SELECT sync.resume('trap');
SELECT sync.pause('trap', 'Account'); SELECT sync.resume('trap', 'Account');
SELECT sync.run_now('trap'); SELECT sync.run_now('trap', 'Account');
SELECT sync.reconcile('trap', 'Account');
SELECT sync.resync('trap', 'Account');
SELECT sync.reset_stats('trap'); SELECT sync.reset_stats('trap', 'Account'); SELECT sync.reset_stats();
SELECT count(*) FROM sync.status; SELECT count(*) FROM sync.budgets; SELECT count(*) FROM sync.columns;
SELECT count(*) FROM sync.available_fields; SELECT count(*) FROM sync.stat_sources; SELECT count(*) FROM sync.rejected;
SELECT sync.add_notification('trapn', 'webhook', 'http://127.0.0.1:9/hook');
SELECT sync.drop_notification('trapn');
SELECT sync.wait_for_backfill('trap', 'Account', '90 s');
SELECT sync.remove_collection('trap', 'Account', true);
SELECT sync.drop_source('trap', true);
SELECT (SELECT count(*) FROM pg_temp.sources) + (SELECT count(*) FROM pg_temp.source_secrets)
     + (SELECT count(*) FROM pg_temp.collections) + (SELECT count(*) FROM pg_temp.collection_state);
";
($ret, $out, $err) = psql_as(undef, $session);
is($ret, 0, 'the superuser session with the hostile search_path ran every API function') or diag $err;
my @o = split /\n/, $out;
is($o[-1], '0', 'the temp tables named like sync\'s were not written');
unlike($err, qr/TRAP/, 'no trap warning was raised in the superuser session');
ok(wait_sql(30, "SELECT NOT EXISTS (SELECT 1 FROM sync.sources WHERE name = 'trap')"), 'the trap source is gone');
is(sql("SELECT coalesce(string_agg(fn || ' by ' || by_user, ', '), '') FROM public.trap_log"), '',
	'none of alice\'s functions, operators or trigger tables ran (in the backend or the worker)');
is(sql("SELECT (SELECT count(*) FROM public.sources) + (SELECT count(*) FROM alice.sources) "
	  . "+ (SELECT count(*) FROM public.source_secrets) + (SELECT count(*) FROM alice.collection_state)"), '0',
	'alice\'s look-alike tables stayed empty');

# ---------------------------------------------------------------------------
# 9. The server log
# ---------------------------------------------------------------------------

# Everything is done: the worker logged its failures (LOG lines with the error) at debug1.
sql("SELECT sync.pause('acme')");
my $log = slurp_file($node->logfile);
like($log, qr/sync of collection \d+ failed: Salesforce token refresh failed with HTTP 400 invalid_grant/,
	'control: the worker logged the token refresh failures');
like($log, qr/DEBUG:/, 'control: the log has debug1 lines');
my %log_hits;
for my $line (split /\n/, $log)
{
	$log_hits{$_}++ for secrets_in($line);
}
is(join(', ', map { "$_ ($log_hits{$_} lines)" } sort keys %log_hits), '',
	'BUG if failing: the server log holds no credential, refresh token or access token');
if (%log_hits)
{
	my $n = 0;
	for my $line (split /\n/, $log)
	{
		next unless secrets_in($line);
		diag "log: $line";
		last if ++$n >= 6;
	}
}

note 'elapsed ' . elapsed();
done_testing();
