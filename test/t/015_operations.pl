
# Operations (issue 6): DROP EXTENSION, DROP DATABASE, ALTER EXTENSION UPDATE
# and a pg_upgrade never hang and never leave a worker or a half-synced table
# behind; a user's lock on a synced table delays that collection only.
#
#   1. DROP EXTENSION in a non-default database with two sources, both in the
#      middle of a backfill, while an API request the fake delays is in flight:
#      it returns at once, the worker is gone within seconds, the synced tables
#      stay as plain tables holding whole committed pages only (no page lands
#      after the drop); CREATE EXTENSION again brings a new worker that syncs.
#   2. DROP DATABASE of that database with two sources, one mid-backfill with a
#      delayed request in flight.
#   3. Versions: CREATE EXTENSION sync VERSION '0.1.0' with the 0.2.0 library
#      loaded syncs nothing (one LOG message, its hint asks for ALTER EXTENSION
#      sync UPDATE; no API request); ALTER EXTENSION sync UPDATE returns at once and syncing
#      starts; UPDATE TO '0.2.0' again is a no-op.
#   4. Locks: LOCK TABLE ... ACCESS EXCLUSIVE / SHARE and SELECT ... FOR UPDATE
#      on a synced table held open by a user: that collection shows state
#      'waiting for lock' and waiting_on 'lock on <table> held by pid <pid>',
#      no failure is counted, the worker never waits for the lock longer than
#      about sync.lock_timeout, the source's other collection and another
#      source keep syncing, and the collection catches up after the release.
#   5. pg_upgrade of the cluster: no sync process runs in binary-upgrade mode
#      (no API request during the upgrade, no sync process in its server log);
#      the upgraded cluster resumes every collection from its preserved cursor
#      (no backfill query, incremental queries from the stored keyset) and the
#      changes made during the upgrade arrive.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use Cwd qw(getcwd);
use File::Find;
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;

my $suite_started = time;
http_options(timeout => 30);

my $CREDENTIALS = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $PAGE = 200;    # batch_size of the sources whose pages are counted

###############################################################################
# Helpers (SyncTest.pm has the fakes, SQL and waiting helpers)
###############################################################################

my $node;

sub fmt { return defined $_[0] ? sprintf('%.2f', $_[0]) : 'never'; }

# Poll $cond every 100 ms until true: seconds waited, or undef after $timeout.
sub wait_for
{
	my ($what, $timeout, $cond) = @_;
	my $t0 = time;
	while (1)
	{
		return time - $t0 if $cond->();
		if (time - $t0 > $timeout)
		{
			diag "timed out after ${timeout}s waiting for $what";
			return undef;
		}
		usleep(100_000);
	}
}

# pids of the sync workers connected to database $db (by name), "p1,p2" or "".
sub worker_pids
{
	my ($db) = @_;
	return sql("SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM pg_stat_activity "
		  . "WHERE backend_type = 'sync worker' AND datname = " . lit($db));
}

# The fake's API requests (not admin calls), in arrival order.
sub api_log
{
	my ($F) = @_;
	return [ sort { $a->{t} <=> $b->{t} } grep { $_->{path} =~ m{^/services/} } @{ admin($F, 'GET', 'requests') } ];
}

sub is_query    { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/?$}; }
sub is_queryall { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/queryAll/?$}; }
sub is_query_more { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/[^/]+$}; }

# A backfill's first page: query (not queryAll) of every record ordered by SystemModstamp.
sub is_backfill_query
{
	my ($e, $obj) = @_;
	my $soql = soql_of($e) // '';
	return is_query($e) && $soql =~ /\bFROM \Q$obj\E\b/ && $soql =~ /ORDER BY SystemModstamp/;
}

sub brief
{
	my ($e) = @_;
	my $soql = soql_of($e);
	return sprintf('%.3f %s %s%s', $e->{t}, $e->{status} // '-', $e->{path}, defined $soql ? " q=$soql" : '');
}

# Columns compared with the fake's records: API field => SQL expression giving the
# fake's wire form.
my $MODSTAMP_SQL = q{to_char(system_modstamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS') || '+0000'};
my %COMPARED = (
	Contact => [ [ SystemModstamp => $MODSTAMP_SQL ], [ LastName => 'last_name' ], [ FirstName => 'first_name' ],
		[ Email => 'email' ], [ AccountId => 'account_id' ] ],
	Account => [ [ SystemModstamp => $MODSTAMP_SQL ], [ Name => 'name' ], [ Industry => 'industry' ] ],
);

my $truth_dir = PostgreSQL::Test::Utils::tempdir;
my $truth_n = 0;

# Compare table $table of database $db with the live records of $obj in fake $F:
# every row must equal its record; unless $opt{subset}, every record must have a row.
# $opt{expect}: the summary expected instead of no difference (to show a difference is seen).
# The fake's records are dumped to a file and compared in SQL (pg_read_file).
sub compare_with_truth
{
	my ($db, $table, $F, $obj, $label, %opt) = @_;
	my @cols = @{ $COMPARED{$obj} };
	my $file = "$truth_dir/truth_" . ++$truth_n . '.json';
	open(my $fh, '>:raw', $file) or die "cannot write $file: $!";
	my $res = http()->request('GET', "$F->{url}/__admin/records/$obj", { data_callback => sub { print $fh $_[0]; } });
	close($fh);
	die "records of $obj: $res->{status}" unless $res->{success};
	my $mine = join(q{ || ' | ' || }, map { "coalesce(($_->[1])::text, 'NULL')" } @cols);
	my $theirs = join(q{ || ' | ' || }, map { "coalesce(r->>'$_->[0]', 'NULL')" } @cols);
	my $out = sql_in($db, qq{
CREATE TEMP TABLE fake_truth AS
  SELECT r->>'Id' AS id, $theirs AS v FROM jsonb_array_elements(pg_read_file('$file')::jsonb) r;
CREATE TEMP TABLE mine AS SELECT id, $mine AS v FROM $table;
SELECT format('%s missing, %s extra, %s different|%s|%s',
       count(*) FILTER (WHERE m.id IS NULL AND ${\($opt{subset} ? 'false' : 'true')}),
       count(*) FILTER (WHERE f.id IS NULL),
       count(*) FILTER (WHERE m.v <> f.v),
       (SELECT count(*) FROM mine),
       coalesce(string_agg(coalesce(m.id, f.id) || ': table [' || coalesce(m.v, '-') || '] fake [' || coalesce(f.v, '-') || ']',
                           E'\n') FILTER (WHERE (m.id IS NULL AND ${\($opt{subset} ? 'false' : 'true')})
                                              OR f.id IS NULL OR m.v <> f.v), ''))
  FROM mine m FULL JOIN fake_truth f ON f.id = m.id;});
	my ($summary, $rows, $examples) = split /\|/, $out, 3;
	my $expect = $opt{expect} // '0 missing, 0 extra, 0 different';
	is($summary, $expect,
		"$label: $table " . ($opt{expect} ? "differs from the fake's $obj records by $expect" : "equals the fake's $obj records")
		  . ($opt{subset} ? ' (every row it holds)' : '') . " ($rows rows)");
	diag join("\n", grep { defined } (split /\n/, $examples)[0 .. 4]) if $examples ne '' && !$opt{expect};
	return $rows;
}

sub count_of { return sql_in($_[0], "SELECT count(*) FROM $_[1]"); }

# The value of $col of row $id in $table ('' when there is no such row).
sub value_of
{
	my ($db, $table, $col, $id) = @_;
	return sql_in($db, "SELECT coalesce((SELECT $col FROM $table WHERE id = " . lit($id) . ")::text, '')");
}

sub log_since { return slurp_file($node->logfile, $_[0]); }

###############################################################################
# Fakes and the server
###############################################################################

my %fake;
for my $spec ([ 'ops1', 3000 ], [ 'ops2', 6000 ], [ 'acme', 500, '--accounts', 60 ], [ 'beta', 300 ], [ 'ver', 400 ])
{
	my ($name, $records, @more) = @$spec;
	$fake{$name} = eval { start_fake('salesforce', $name, { timeout => 60 }, '--records', $records, @more) }
	  or BAIL_OUT("fake Salesforce $name did not start: $@");
}
note 'fakes: ' . join(', ', map { "$_ $fake{$_}{url}" } sort keys %fake);

$node = start_node();
my $launcher_pid = sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sync launcher'");
like($launcher_pid, qr/^\d+$/, 'the sync launcher runs');

sub create_source
{
	my ($db, $name, $F, $options) = @_;
	sql_in($db, "SELECT sync.create_source('$name', 'salesforce', '$F->{url}', '$CREDENTIALS', '$options')");
}

my ($ret, $out, $err, $t0, $log_offset, $waited);    # scratch, shared by the parts

# Collections that must survive the pg_upgrade of part 5:
# { db, source, collection, fake, table }.
my @synced;

###############################################################################
# 1. DROP EXTENSION mid-backfill, two sources, a delayed request in flight
###############################################################################

sub part_drop
{
	sql('CREATE DATABASE ops');
	sql_in('ops', 'CREATE EXTENSION sync');
	ok(defined wait_for('a worker for ops', 20, sub { worker_pids('ops') =~ /^\d+$/ }), 'ops: a worker starts');
	my $ops_worker = worker_pids('ops');

	# Slow budgets (2 requests/s, 200-record pages): s2's 6000 records take 30 pages, 15 s.
	my $slow = qq({"requests_per_second": 2, "burst": 1, "batch_size": $PAGE, "poll_interval": 1});
	create_source('ops', 's2', $fake{ops2}, $slow);
	sql_in('ops', q{SELECT sync.add_collection('s2', 'Contact')});
	ok(defined wait_for('the first page of s2', 30, sub { count_of('ops', 's2.contact') >= $PAGE }),
		'ops: s2 backfill under way');

	# The first queryMore of s1 (its second backfill page) is held 12 s by the fake.
	my $delay = 12;
	my $fault = admin($fake{ops1}, 'POST', 'faults', { path_regex => '/query/[^/?]+-\d+', delay => $delay, count => 1 });
	create_source('ops', 's1', $fake{ops1}, $slow);
	sql_in('ops', q{SELECT sync.add_collection('s1', 'Contact')});
	my $fault_hit_at;
	ok(defined wait_for('the delayed request of s1', 40, sub {
		my ($f) = grep { $_->{id} == $fault->{id} } @{ admin($fake{ops1}, 'GET', 'faults') };
		$fault_hit_at = time if $f && $f->{hits} == 1;
		return defined $fault_hit_at;
	}), 'ops: the worker sent the request the fake delays');
	$fault_hit_at //= time;
	ok(defined wait_for('the worker to wait for the API', 5, sub {
		sql("SELECT query FROM pg_stat_activity WHERE pid = $ops_worker") eq 'sync: waiting for the API';
	}), 'ops: pg_stat_activity shows the worker waiting for the API');

	my %before_drop = (s1 => count_of('ops', 's1.contact'), s2 => count_of('ops', 's2.contact'));
	note "before DROP EXTENSION: s1.contact $before_drop{s1} rows, s2.contact $before_drop{s2} rows";
	is($before_drop{s1}, $PAGE, 'ops: s1 holds exactly its first page');
	ok($before_drop{s2} > 0 && $before_drop{s2} < 6000, 'ops: s2 is in the middle of its backfill');
	is(sql_in('ops', q{SELECT string_agg(phase, ',' ORDER BY source) FROM sync.status}), 'backfill,backfill',
		'ops: both collections are backfilling');

	$log_offset = -s $node->logfile;
	$t0 = time;
	($ret, $out, $err) = $node->psql('ops', "SET statement_timeout = '20s'; DROP EXTENSION sync");
	my $drop_s = time - $t0;
	note 'DROP EXTENSION took ' . fmt($drop_s) . " s; stderr: $err";
	is($ret, 0, 'ops: DROP EXTENSION sync succeeds while a backfill request is in flight');
	ok($drop_s < 5, 'ops: DROP EXTENSION returns within seconds (' . fmt($drop_s) . ' s)');
	my $gone = wait_for('the worker of ops to exit', $delay + 5, sub { worker_pids('ops') eq '' });
	my $gone_s = defined $gone ? time - $t0 : undef;
	note 'the worker of ops exited ' . fmt($gone_s) . " s after DROP EXTENSION (the request in flight is held ${delay} s)";
	ok(defined $gone_s && $gone_s < 5,
		'ops: no sync worker remains in pg_stat_activity within seconds of DROP EXTENSION, mid-request');
	ok(!kill(0, $ops_worker), 'ops: the old worker process is gone');

	# Let the held request finish: nothing may land in the tables after the drop.
	my $rest = $fault_hit_at + $delay + 2 - time;
	sleep $rest if $rest > 0;
	sleep 1;
	is(count_of('ops', 's1.contact'), $before_drop{s1}, 'ops: no page of s1 was written after DROP EXTENSION');
	is(count_of('ops', 's2.contact'), $before_drop{s2}, 'ops: no page of s2 was written after DROP EXTENSION');
	is(worker_pids('ops'), '', 'ops: no worker came back while the extension is absent');

	# The synced tables stay, as plain tables of the user (sync does not drop user data):
	# no dependency on the extension, no trigger, whole pages only, every row correct.
	# (CREATE EXTENSION made schema sync because the control file names it; Postgres leaves
	# such a schema when the extension is dropped. It must hold nothing.)
	is(sql_in('ops', q{SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid)
		+ (SELECT count(*) FROM pg_proc WHERE pronamespace = n.oid) + (SELECT count(*) FROM pg_type WHERE typnamespace = n.oid)
		FROM pg_namespace n WHERE nspname = 'sync' UNION ALL SELECT 0 LIMIT 1}), '0', 'ops: nothing of the extension is left in schema sync');
	is(sql_in('ops', q{SELECT coalesce(string_agg(c::text, ',' ORDER BY c::text), '') FROM
		(VALUES (to_regclass('s1.contact')), (to_regclass('s2.contact'))) v(c)}),
		's1.contact,s2.contact', 'ops: the synced tables are left behind as tables');
	is(sql_in('ops', q{SELECT count(*) FROM pg_depend WHERE objid IN ('s1.contact'::regclass, 's2.contact'::regclass)
		AND refclassid = 'pg_extension'::regclass}), '0', 'ops: the left tables do not depend on any extension');
	is(sql_in('ops', q{SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('s1.contact'::regclass, 's2.contact'::regclass)}),
		'0', 'ops: no trigger is left on them');
	is(sql_in('ops', q{SELECT count(*) FROM pg_event_trigger}), '0', 'ops: no event trigger is left');
	for my $s ('s1', 's2')
	{
		is(count_of('ops', "$s.contact") % $PAGE, 0, "ops: $s.contact holds whole pages only");
		compare_with_truth('ops', "$s.contact", $fake{$s eq 's1' ? 'ops1' : 'ops2'}, 'Contact', "ops/$s after DROP EXTENSION",
			subset => 1);
	}
	is(sql_in('ops', q{UPDATE s1.contact SET last_name = 'mine' WHERE id = (SELECT min(id) FROM s1.contact) RETURNING last_name}),
		'mine', 'ops: a left table is an ordinary writable table');
	compare_with_truth('ops', 's1.contact', $fake{ops1}, 'Contact', 'ops/s1 after a user\'s write', subset => 1,
		expect => '0 missing, 0 extra, 1 different');
	unlike(log_since($log_offset), qr/deadlock detected|terminating any other active server processes|was terminated by signal/,
		'ops: no deadlock and no crash around DROP EXTENSION');
	is(sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sync launcher'"), $launcher_pid,
		'the launcher is untouched');

	# CREATE EXTENSION again: a new worker, and syncing works.
	$t0 = time;
	sql_in('ops', 'CREATE EXTENSION sync');
	$waited = wait_for('a new worker for ops', 15, sub { worker_pids('ops') =~ /^\d+$/ });
	ok(defined $waited && $waited < 10, 'ops: CREATE EXTENSION again starts a new worker (' . fmt($waited) . ' s)');
	isnt(worker_pids('ops'), $ops_worker, 'ops: it is a new process');
	$ops_worker = worker_pids('ops');
	admin($fake{ops1}, 'DELETE', 'faults');
	create_source('ops', 's1', $fake{ops1}, qq({"requests_per_second": 50, "burst": 5, "batch_size": $PAGE, "poll_interval": 1}));
	($ret, $out, $err) = $node->psql('ops', q{SELECT sync.add_collection('s1', 'Contact')});
	isnt($ret, 0, 'ops: add_collection refuses to take over the table left by DROP EXTENSION');
	like($err, qr/table s1\.contact already exists/, 'ops: ... saying the table exists');
	sql_in('ops', 'DROP TABLE s1.contact');
	sql_in('ops', q{SELECT sync.add_collection('s1', 'Contact')});
	is(sql_in('ops', q{SELECT sync.wait_for_backfill('s1', 'Contact', '90 s')}), 't',
		'ops: after the user drops it, the collection is backfilled by the new worker');
	compare_with_truth('ops', 's1.contact', $fake{ops1}, 'Contact', 'ops/s1 after CREATE EXTENSION again');

	# ---- 2. DROP DATABASE with two sources, one mid-backfill with a delayed request in flight

	sql_in('ops', 'DROP SCHEMA s2 CASCADE');
	$fault = admin($fake{ops2}, 'POST', 'faults', { path_regex => '/query/[^/?]+-\d+', delay => $delay, count => 1 });
	create_source('ops', 's2', $fake{ops2}, $slow);
	sql_in('ops', q{SELECT sync.add_collection('s2', 'Contact')});
	ok(defined wait_for('the delayed request of s2', 40, sub {
		my ($f) = grep { $_->{id} == $fault->{id} } @{ admin($fake{ops2}, 'GET', 'faults') };
		return $f && $f->{hits} == 1;
	}), 'ops: s2 is backfilling again and its second page is held by the fake');
	ok(defined wait_for('the worker to wait for the API', 5, sub {
		sql("SELECT query FROM pg_stat_activity WHERE pid = $ops_worker") eq 'sync: waiting for the API';
	}), 'ops: the worker waits for the API');
	my $ops_oid = sql("SELECT oid FROM pg_database WHERE datname = 'ops'");
	$log_offset = -s $node->logfile;
	$t0 = time;
	($ret, $out, $err) = $node->psql('postgres', "SET statement_timeout = '30s'; DROP DATABASE ops");
	my $dropdb_s = time - $t0;
	note 'DROP DATABASE ops took ' . fmt($dropdb_s) . " s; stderr: $err";
	is($ret, 0, 'DROP DATABASE succeeds while its worker waits for a delayed API request');
	ok($dropdb_s < 5, 'DROP DATABASE returns within seconds (' . fmt($dropdb_s) . ' s)');
	ok(defined wait_for('the worker of ops to end', 5, sub { !kill(0, $ops_worker) }), 'the worker of the dropped database is gone');
	sleep 3;
	is(sql("SELECT count(*) FROM pg_stat_activity WHERE datid = $ops_oid"), '0',
		'no process is connected to the dropped database');
	unlike(log_since($log_offset), qr/database \d+ does not exist|terminating any other active server processes/,
		'the launcher never tried to start a worker for it; no crash');
	is(sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sync launcher'"), $launcher_pid,
		'the launcher is untouched by DROP DATABASE');
}

###############################################################################
# 3. Versions: 0.1.0 installed with the 0.2.0 library loaded
###############################################################################

sub part_version
{
	is(sql(q{SELECT default_version FROM pg_available_extensions WHERE name = 'sync'}), '0.2.0',
		'the default version of the extension is 0.2.0');
	is(sql(q{SELECT extversion FROM pg_extension WHERE extname = 'sync'}), '0.2.0', 'postgres has 0.2.0 installed');

	sql('CREATE DATABASE ver');
	$log_offset = -s $node->logfile;
	($ret, $out, $err) = $node->psql('ver', q{CREATE EXTENSION sync VERSION '0.1.0'});
	is($ret, 0, q{ver: CREATE EXTENSION sync VERSION '0.1.0' works}) or diag $err;
	is(sql_in('ver', q{SELECT extversion FROM pg_extension WHERE extname = 'sync'}), '0.1.0', 'ver: 0.1.0 installed');
	ok(defined wait_for('a worker for ver', 20, sub { worker_pids('ver') =~ /^\d+$/ }), 'ver: a worker runs');
	my $ver_worker = worker_pids('ver');

	# Source and collection in one transaction: the backend then gets the token itself
	# (the worker is not asked for anything).
	($ret, $out, $err) = $node->psql('ver', qq{BEGIN;
	SELECT sync.create_source('v1', 'salesforce', '$fake{ver}{url}', '$CREDENTIALS',
		'{"requests_per_second": 50, "burst": 5, "poll_interval": 1}');
	SELECT sync.add_collection('v1', 'Contact');
	COMMIT;});
	is($ret, 0, 'ver: create_source and add_collection work on 0.1.0') or diag $err;
	my $n_after_add = scalar @{ api_log($fake{ver}) };
	sleep 6;
	my $ver_log = api_log($fake{ver});
	is(scalar(grep { is_query($_) || is_queryall($_) || is_query_more($_) } @$ver_log), 0,
		'ver: no query is sent while the installed version differs from the library');
	is(scalar(@$ver_log) - $n_after_add, 0, 'ver: no API request at all after add_collection');
	is(sql_in('ver', 'SELECT count(*) FROM v1.contact'), '0', 'ver: no row is synced');
	my @ver_lines = split /\n/, log_since($log_offset);
	my @mismatch = grep { /LOG:.*version 0\.1\.0 is installed in database "ver".*library is version 0\.2\.0/ } @ver_lines;
	my @hint = grep { /ALTER EXTENSION sync UPDATE/ } @ver_lines;
	note "log: $_" for @mismatch, @hint;
	is(scalar @mismatch, 1, 'ver: the server log has one LOG message: 0.1.0 installed, library 0.2.0');
	is(scalar @hint, 1, 'ver: ... with one line asking for ALTER EXTENSION sync UPDATE');
	is(worker_pids('ver'), $ver_worker, 'ver: the worker keeps running (not restarted over and over)');
	my $ver_status = eval { sql_in('ver', q{SELECT state FROM sync.status WHERE source = 'v1'}) };
	note 'ver: sync.status on 0.1.0: ' . ($ver_status // "error: $@");

	$t0 = time;
	($ret, $out, $err) = $node->psql('ver', "SET statement_timeout = '20s'; ALTER EXTENSION sync UPDATE");
	my $update_s = time - $t0;
	is($ret, 0, 'ver: ALTER EXTENSION sync UPDATE succeeds while the worker runs') or diag $err;
	ok($update_s < 5, 'ver: ... within seconds (' . fmt($update_s) . ' s)');
	is(sql_in('ver', q{SELECT extversion FROM pg_extension WHERE extname = 'sync'}), '0.2.0', 'ver: 0.2.0 installed');
	$waited = wait_for('the first query of v1', 15, sub { scalar grep { is_query($_) } @{ api_log($fake{ver}) } });
	ok(defined $waited && $waited < 8, 'ver: syncing starts within seconds of the update (' . fmt($waited) . ' s)');
	is(sql_in('ver', q{SELECT sync.wait_for_backfill('v1', 'Contact', '60 s')}), 't', 'ver: the backfill completes');
	compare_with_truth('ver', 'v1.contact', $fake{ver}, 'Contact', 'ver after ALTER EXTENSION UPDATE');
	push @synced, { db => 'ver', source => 'v1', collection => 'Contact', fake => $fake{ver}, table => 'v1.contact' };

	($ret, $out, $err) = $node->psql('ver', q{ALTER EXTENSION sync UPDATE TO '0.2.0'});
	is($ret, 0, q{ver: ALTER EXTENSION sync UPDATE TO '0.2.0' on 0.2.0 succeeds});
	like($err, qr/version "0\.2\.0" of extension "sync" is already installed/, 'ver: ... as a no-op notice');
	is(worker_pids('ver') =~ /^\d+$/ ? 'running' : 'none', 'running', 'ver: the worker still runs');
}

###############################################################################
# 4. Locks held by a user on a synced table
###############################################################################

# State of part 4 shared by its helpers.
my ($lock_timeout_ms, $wpid, $Z, $W, $X, $Y, $mon, @samples, $locker, $lpid, $prompt);

sub sample_worker
{
	push @samples, [ time, $mon->query_safe("SELECT coalesce(wait_event_type, '-') FROM pg_stat_activity WHERE pid = $wpid") ];
}

# Longest stretch the worker was seen waiting for a heavyweight lock, in seconds.
sub longest_lock_wait
{
	my ($from) = @_;
	my ($longest, $start) = (0, undef);
	for my $s (grep { $_->[0] >= $from } @samples)
	{
		if ($s->[1] eq 'Lock') { $start //= $s->[0]; $longest = $s->[0] - $start if $s->[0] - $start > $longest; }
		else { $start = undef; }
	}
	return $longest;
}

# Change $field of record $id of $obj in fake $F.
sub change
{
	my ($F, $obj, $id, $field, $value) = @_;
	admin($F, 'PATCH', "records/$obj/$id", { $field => $value });
}

# Wait (sampling the worker) until $col of row $id of $table (database postgres) is
# $value: seconds, or undef.
sub wait_value
{
	my ($what, $timeout, $table, $col, $id, $value) = @_;
	return wait_for($what, $timeout, sub {
		sample_worker();
		return value_of('postgres', $table, $col, $id) eq $value;
	});
}

sub status_line
{
	my ($s, $c) = @_;
	my $st = status_of($s, $c);
	return join(', ', map { "$_=" . ($st->{$_} // 'NULL') } qw(state waiting_on consecutive_failures last_error activity));
}

# Run one lock scenario: $lock_sql in the locker's open transaction, then the changes;
# checks the waits and the release ($end_sql).
sub lock_scenario
{
	my (%a) = @_;
	my $label = $a{label};
	$locker->query_safe('BEGIN');
	$locker->query_safe($a{lock_sql});
	my $from = time;
	change($fake{acme}, 'Contact', $Z, 'LastName', "$label Z");
	change($fake{acme}, 'Contact', $W, 'LastName', "$label W") if $a{with_w};
	change($fake{acme}, 'Account', $X, 'Name', "$label 1");
	change($fake{beta}, 'Contact', $Y, 'LastName', "$label 1");
	my $acc = wait_value("$label: the account change", 30, 'acme.account', 'name', $X, "$label 1");
	my $bet = wait_value("$label: the beta change", 30, 'beta.contact', 'last_name', $Y, "$label 1");
	note "$label: account change after " . fmt($acc) . ' s, beta change after ' . fmt($bet) . ' s';
	ok(defined $acc && $acc < $prompt, "$label: the source's other collection (Account) syncs promptly");
	ok(defined $bet && $bet < $prompt, "$label: another source's collection syncs promptly");

	my $waiting = wait_for("$label: state waiting for lock", 20, sub {
		sample_worker();
		return sql(q{SELECT state FROM sync.status WHERE source = 'acme' AND collection = 'Contact'}) eq 'waiting for lock';
	});
	ok(defined $waiting, "$label: the locked collection shows state 'waiting for lock'")
	  or diag status_line('acme', 'Contact');
	my $st = status_of('acme', 'Contact');
	like($st->{waiting_on} // '', qr/^lock on acme\.contact held by pid $lpid\b/,
		"$label: waiting_on names the table and the blocker's pid ($st->{waiting_on})");
	is($st->{consecutive_failures}, 0, "$label: no failure is counted");
	is(status_of('acme', 'Account')->{state}, 'syncing', "$label: Account is 'syncing'");
	is(status_of('beta', 'Contact')->{state}, 'syncing', "$label: beta's Contact is 'syncing'");

	# Later changes of the others keep coming while the lock is held.
	change($fake{acme}, 'Account', $X, 'Name', "$label 2");
	change($fake{beta}, 'Contact', $Y, 'LastName', "$label 2");
	$acc = wait_value("$label: the second account change", 30, 'acme.account', 'name', $X, "$label 2");
	$bet = wait_value("$label: the second beta change", 30, 'beta.contact', 'last_name', $Y, "$label 2");
	note "$label: second account change after " . fmt($acc) . ' s, beta after ' . fmt($bet) . ' s';
	ok(defined $acc && $acc < $prompt && defined $bet && $bet < $prompt,
		"$label: while the lock is held the other collections keep syncing");
	my $until = time + 3;
	while (time < $until) { sample_worker(); usleep(50_000); }
	my $held = $a{read_locked}->();
	is($held->{Z}, 'not arrived', "$label: the locked collection's change has not been written");
	is($held->{W}, 'not arrived', "$label: nor the other change of its page") if $a{with_w};
	is(status_of('acme', 'Contact')->{consecutive_failures}, 0, "$label: still no failure counted");
	if ($a{release_in_lock_wait})
	{
		# A page put back after waiting for locked rows is retried with a growing delay
		# (README, Locks): release while the worker waits for the rows, so that the
		# catch-up below measures the wait itself, not where the delay happens to be.
		my $seen = wait_for("$label: the worker waiting for the locked row", 45, sub {
			sample_worker();
			return $samples[-1][1] eq 'Lock';
		});
		ok(defined $seen, "$label: the worker retries the page and waits for the row (wait_event_type Lock)");
	}
	my $longest = longest_lock_wait($from);
	my $n = grep { $_->[0] >= $from } @samples;
	note sprintf('%s: %d samples of the worker, %d in a Lock wait, longest Lock wait seen %.2f s', $label, $n,
		scalar(grep { $_->[0] >= $from && $_->[1] eq 'Lock' } @samples), $longest);
	ok($longest < $lock_timeout_ms / 1000 + 1.0,
		"$label: the worker never waits for the lock much longer than sync.lock_timeout");
	is(sql("SELECT backend_type FROM pg_stat_activity WHERE pid = $wpid"), 'sync worker', "$label: the same worker runs");

	$locker->query_safe($a{end_sql});
	my $caught = wait_value("$label: the contact change after release", 30, 'acme.contact', 'last_name', $Z, "$label Z");
	note "$label: contact change arrived " . fmt($caught) . " s after $a{end_sql}";
	ok(defined $caught && $caught < $prompt, "$label: after $a{end_sql} the collection catches up within seconds");
	is(value_of('postgres', 'acme.contact', 'last_name', $W), "$label W", "$label: with the other change of its page")
	  if $a{with_w};
	ok(defined wait_for("$label: state syncing", 15, sub {
		sql(q{SELECT state FROM sync.status WHERE source = 'acme' AND collection = 'Contact'}) eq 'syncing';
	}), "$label: the collection is 'syncing' again") or diag status_line('acme', 'Contact');
	$st = status_of('acme', 'Contact');
	is($st->{waiting_on}, undef, "$label: waiting_on is cleared");
	is($st->{consecutive_failures}, 0, "$label: consecutive_failures is 0");
}

sub part_locks
{
	my $fast = '{"requests_per_second": 20, "burst": 5, "poll_interval": 1}';
	create_source('postgres', 'acme', $fake{acme}, $fast);
	sql(q{SELECT sync.add_collection('acme', 'Contact')});
	sql(q{SELECT sync.add_collection('acme', 'Account')});
	create_source('postgres', 'beta', $fake{beta}, $fast);
	sql(q{SELECT sync.add_collection('beta', 'Contact')});
	for my $c ([ 'acme', 'Contact' ], [ 'acme', 'Account' ], [ 'beta', 'Contact' ])
	{
		is(sql("SELECT sync.wait_for_backfill('$c->[0]', '$c->[1]', '90 s')"), 't', "$c->[0].$c->[1]: backfill completes");
	}
	push @synced,
	  { db => 'postgres', source => 'acme', collection => 'Contact', fake => $fake{acme}, table => 'acme.contact' },
	  { db => 'postgres', source => 'acme', collection => 'Account', fake => $fake{acme}, table => 'acme.account' },
	  { db => 'postgres', source => 'beta', collection => 'Contact', fake => $fake{beta}, table => 'beta.contact' };

	$lock_timeout_ms = sql(q{SELECT setting FROM pg_settings WHERE name = 'sync.lock_timeout'});
	note "sync.lock_timeout = $lock_timeout_ms ms";
	$wpid = sql('SELECT sync.worker_pid()');
	like($wpid, qr/^\d+$/, 'postgres has a worker');

	my @contact_ids = map { $_->{Id} } @{ admin($fake{acme}, 'GET', 'records/Contact') };
	my @account_ids = map { $_->{Id} } @{ admin($fake{acme}, 'GET', 'records/Account') };
	my @beta_ids = map { $_->{Id} } @{ admin($fake{beta}, 'GET', 'records/Contact') };
	($Z, $W) = @contact_ids[ 10, 20 ];    # the contacts a user locks / that share its page
	$X = $account_ids[5];
	$Y = $beta_ids[7];

	# A monitoring session (fast samples of the worker's wait state).
	$mon = $node->background_psql('postgres', on_error_stop => 1);
	@samples = ();    # [time, wait_event_type]

	# Baseline without a lock.
	change($fake{acme}, 'Account', $X, 'Name', 'Acct base');
	change($fake{beta}, 'Contact', $Y, 'LastName', 'Beta base');
	change($fake{acme}, 'Contact', $Z, 'LastName', 'Contact base');
	my %base;
	$base{account} = wait_value('the account change', 30, 'acme.account', 'name', $X, 'Acct base');
	$base{beta} = wait_value('the beta change', 30, 'beta.contact', 'last_name', $Y, 'Beta base');
	$base{contact} = wait_value('the contact change', 30, 'acme.contact', 'last_name', $Z, 'Contact base');
	note 'without a lock the changes arrived after ' . join(', ', map { "$_ " . fmt($base{$_}) . ' s' } sort keys %base);
	ok(defined $base{account} && defined $base{beta} && defined $base{contact}, 'without a lock every change arrives');
	$prompt = 8;    # seconds: "promptly" on a busy 2-core machine (poll_interval 1)

	$locker = $node->background_psql('postgres', on_error_stop => 1);
	$lpid = $locker->query_safe('SELECT pg_backend_pid()');

	lock_scenario(
		label => 'ACCESS EXCLUSIVE',
		lock_sql => 'LOCK TABLE acme.contact IN ACCESS EXCLUSIVE MODE',
		end_sql => 'COMMIT',
		read_locked => sub {    # only the locker can read the table now
			my $v = $locker->query_safe("SELECT last_name FROM acme.contact WHERE id = '$Z'");
			return { Z => $v eq 'ACCESS EXCLUSIVE Z' ? 'arrived' : 'not arrived' };
		});

	lock_scenario(
		label => 'SHARE',
		lock_sql => 'LOCK TABLE acme.contact IN SHARE MODE',
		end_sql => 'ROLLBACK',
		with_w => 1,
		read_locked => sub {    # SHARE lets others read
			return {
				Z => value_of('postgres', 'acme.contact', 'last_name', $Z) eq 'SHARE Z' ? 'arrived' : 'not arrived',
				W => value_of('postgres', 'acme.contact', 'last_name', $W) eq 'SHARE W' ? 'arrived' : 'not arrived' };
		});

	lock_scenario(
		label => 'FOR UPDATE',
		lock_sql => "SELECT id FROM acme.contact WHERE id = '$Z' FOR UPDATE",
		end_sql => 'ROLLBACK',
		with_w => 1,
		release_in_lock_wait => 1,
		read_locked => sub {
			return {
				Z => value_of('postgres', 'acme.contact', 'last_name', $Z) eq 'FOR UPDATE Z' ? 'arrived' : 'not arrived',
				W => value_of('postgres', 'acme.contact', 'last_name', $W) eq 'FOR UPDATE W' ? 'arrived' : 'not arrived' };
		});

	$locker->quit;
	$mon->quit;
	compare_with_truth('postgres', 'acme.contact', $fake{acme}, 'Contact', 'after the locks');
	compare_with_truth('postgres', 'acme.account', $fake{acme}, 'Account', 'after the locks');
	compare_with_truth('postgres', 'beta.contact', $fake{beta}, 'Contact', 'after the locks');
}

###############################################################################
# 5. pg_upgrade
###############################################################################

sub part_upgrade
{
	# Quiesce (sync.enabled = off: no request, so no page and no cursor change), then
	# remember each cursor: the cluster is stopped with exactly these.
	sql('ALTER SYSTEM SET sync.enabled = off');
	sql('SELECT pg_reload_conf()');
	ok(defined wait_for('the workers to go quiet', 30, sub {
		my $n = 0;
		$n += scalar @{ api_log($_->{fake}) } for @synced;
		sleep 2;
		my $m = 0;
		$m += scalar @{ api_log($_->{fake}) } for @synced;
		return $m == $n;
	}), 'with sync.enabled = off the workers make no requests');
	my %kept;
	for my $c (@synced)
	{
		my $k = "$c->{db}/$c->{source}/$c->{collection}";
		my $q = "SELECT row_to_json(x) FROM (SELECT st.cursor, st.phase, st.backfill_completed_at::text AS completed
			FROM sync.collection_state st JOIN sync.collections c ON c.id = st.collection_id
			JOIN sync.sources s ON s.id = c.source_id WHERE s.name = '$c->{source}' AND c.name = '$c->{collection}') x";
		$kept{$k} = JSON::PP->new->decode(sql_in($c->{db}, $q));
		is($kept{$k}{phase}, 'incremental', "$k: incremental before the upgrade");
	}
	# Back on for the servers pg_upgrade starts and for later (no reload: this server stays quiet).
	sql('ALTER SYSTEM RESET sync.enabled');
	my $old_bindir = -x '/usr/lib/postgresql/15/bin/pg_upgrade' ? '/usr/lib/postgresql/15/bin' : $node->config_data('--bindir');
	my $old_data = $node->data_dir;
	my $old_port = $node->port;
	$node->stop;
	my $t_stopped = time;

	# Changes made in the APIs while the cluster is down: a new record, an update, a delete.
	my %during;    # table => { new, updated, deleted }
	for my $c (@synced)
	{
		my $F = $c->{fake};
		my $obj = $c->{collection};
		my @recs = @{ admin($F, 'GET', "records/$obj") };
		my $name_field = $obj eq 'Account' ? 'Name' : 'LastName';
		my $col = $obj eq 'Account' ? 'name' : 'last_name';
		my $new = admin($F, 'POST', "records/$obj", { $name_field => "Upgrade new $c->{source}" });
		admin($F, 'PATCH', "records/$obj/$recs[3]{Id}", { $name_field => "Upgrade changed $c->{source}" });
		admin($F, 'DELETE', "records/$obj/$recs[4]{Id}");
		$during{ $c->{table} } = { new => $new->{Id}, updated => $recs[3]{Id}, deleted => $recs[4]{Id}, col => $col,
			value => "Upgrade changed $c->{source}" };
	}

	my $new = PostgreSQL::Test::Cluster->new('upgraded');
	$new->init;
	$new->append_conf('postgresql.conf',
		"shared_preload_libraries = 'sync'\ntimezone = 'UTC'\nsync.launcher_naptime = 1\nmax_worker_processes = 16\n");

	my $cwd = getcwd();
	my $workdir = PostgreSQL::Test::Utils::tempdir;
	chdir $workdir or die "cannot chdir to $workdir: $!";
	my $t_upgrade = time;
	command_ok(
		[ "$old_bindir/pg_upgrade", '--no-sync', '--retain',
			'-b', $old_bindir, '-B', $old_bindir,
			'-d', $old_data, '-D', $new->data_dir,
			'-p', $old_port, '-P', $new->port, '-s', $new->host,
			'-o', '-c log_min_messages=debug1', '-O', '-c log_min_messages=debug1' ],
		'pg_upgrade of the cluster with the sync library preloaded');
	my $t_upgraded = time;
	chdir $cwd;
	note 'pg_upgrade took ' . fmt($t_upgraded - $t_upgrade) . ' s';

	my @server_logs;
	find(sub { push @server_logs, $File::Find::name if /^pg_upgrade_server\.log$/ }, $new->data_dir . '/pg_upgrade_output.d');
	ok(@server_logs >= 1, 'pg_upgrade kept its server log');
	my $upgrade_log = join('', map { slurp_file($_) } @server_logs);
	like($upgrade_log, qr/DEBUG:/, 'the servers of pg_upgrade logged at DEBUG1 (background workers would show)');
	like($upgrade_log, qr/loaded library "sync"/, 'the sync library was loaded in binary-upgrade mode');
	my @sync_lines = grep { /"sync (launcher|worker)"|sync worker started/ } split /\n/, $upgrade_log;
	is(join("\n", @sync_lines), '', 'no sync launcher or worker ran in binary-upgrade mode');
	for my $name (sort keys %fake)
	{
		next if $name =~ /^ops/;
		my @in = grep { $_->{t} >= $t_stopped } @{ api_log($fake{$name}) };
		is(scalar @in, 0, "fake $name: no API request while the cluster was down or being upgraded")
		  or diag join("\n", map { brief($_) } @in[0 .. ($#in < 5 ? $#in : 5)]);
	}

	my $t_start = time;
	$new->start;
	use_node($new);
	$node = $new;
	my $new_log_offset = 0;
	my %dbs = map { $_->{db} => 1 } @synced;
	for my $db (sort keys %dbs)
	{
		ok(defined wait_for("a worker for $db on the upgraded cluster", 30, sub { worker_pids($db) =~ /^\d+$/ }),
			"upgraded: $db has a worker");
	}
	for my $c (@synced)
	{
		my $d = $during{ $c->{table} };
		my $label = "upgraded $c->{db}/$c->{table}";
		my $arrived = wait_for("$label: the changes made during the upgrade", 60, sub {
			sql_in($c->{db}, "SELECT count(*) FILTER (WHERE id = '$d->{new}') = 1
				AND count(*) FILTER (WHERE id = '$d->{deleted}') = 0
				AND count(*) FILTER (WHERE id = '$d->{updated}' AND $d->{col} = " . lit($d->{value}) . ") = 1
				FROM $c->{table}") eq 't';
		});
		ok(defined $arrived, "$label: the record created, changed and deleted during the upgrade arrive ("
			  . fmt($arrived) . ' s after start)');
		compare_with_truth($c->{db}, $c->{table}, $c->{fake}, $c->{collection}, $label);
	}

	# Every collection resumed from its cursor: no backfill query, its first query is a
	# queryAll from the stored keyset (safe_from or ts), and its backfill is the one of before.
	for my $c (@synced)
	{
		my $k = "$c->{db}/$c->{source}/$c->{collection}";
		my $obj = $c->{collection};
		my @after = grep { $_->{t} >= $t_start && (soql_of($_) // '') =~ /\bFROM \Q$obj\E\b/ } @{ api_log($c->{fake}) };
		is(scalar(grep { is_backfill_query($_, $obj) } @after), 0, "$k: no backfill query after the upgrade")
		  or diag join("\n", map { brief($_) } @after[0 .. ($#after < 5 ? $#after : 5)]);
		my @qa = grep { is_queryall($_) } @after;
		ok(@qa >= 1, "$k: incremental queries (queryAll) after the upgrade");
		my $cur = $kept{$k}{cursor};
		my @starts;
		push @starts, do { my @t = gmtime(int($cur->{safe_from})); sprintf('%04d-%02d-%02dT%02d:%02d:%02dZ', $t[5] + 1900, $t[4] + 1, @t[3, 2, 1, 0]) }
		  if defined $cur->{safe_from};
		push @starts, $cur->{ts} if defined $cur->{ts};
		my $first = @qa ? soql_of($qa[0]) : '';
		ok((grep { index($first, $_) >= 0 } @starts) > 0, "$k: the first poll starts from the preserved cursor (@starts)")
		  or diag "first queryAll: $first";
		my $st = JSON::PP->new->decode(sql_in($c->{db}, "SELECT row_to_json(x) FROM (SELECT phase, backfill_completed_at::text AS completed
			FROM sync.status WHERE source = '$c->{source}' AND collection = '$c->{collection}') x"));
		is($st->{phase}, 'incremental', "$k: still incremental");
		is($st->{completed}, $kept{$k}{completed}, "$k: the backfill completed before the upgrade is the last one");
	}
	my $new_log = slurp_file($new->logfile);
	unlike($new_log, qr/ALTER EXTENSION sync UPDATE/, 'upgraded: no version mismatch is reported');
	unlike($new_log, qr/terminating any other active server processes|was terminated by signal/, 'upgraded: no crash');

	$new->stop;
}

###############################################################################

part_drop();       # 1 and 2
part_version();    # 3
part_locks();      # 4
part_upgrade();    # 5 (stops the cluster)

note 'suite took ' . fmt(time - $suite_started) . ' s';
done_testing();
