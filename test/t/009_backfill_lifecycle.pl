# Backfill lifecycle (issue 5) against the fake Salesforce org (test/fake_salesforce.py) and
# the fake HubSpot portal (test/fake_hubspot.py):
#   1. progress of a 20,000-record backfill at 3 requests/s: backfill_total, records and
#      percent rising to 100, backfill_rate near the budget's 600 records/s, an ETA that
#      falls and predicts the second half; wait_for_backfill; no percent before the total is
#      known; HubSpot's total from search;
#   2. ALTER TABLE ADD COLUMN on a collection synced with some fields: the field is synced,
#      a column backfill fills every row while polls keep applying changes, one NOTIFY,
#      the collection's cursor untouched;
#   3. ALTER COLUMN ... TYPE and sync.alter_column() refill the column in its new type;
#   4. sync.add_column(), and a field added in the API later (schema_interval) listed in
#      sync.available_fields and backfilled when its column is added;
#   5. remove_column / DROP COLUMN stop fetching the field, the key and the version column
#      cannot be dropped (2BP01), a renamed column stays filled, a column naming no field
#      gets a NOTICE and stays null, an ALTER TABLE changing no synced column starts nothing;
#      a drop or rename while a poll is in flight costs the poll no error;
#   6. a (column) backfill or a resync never overwrites a newer row;
#   7. values that do not fit a narrowed column are stored as null and listed in
#      sync.rejected (not readable by PUBLIC).
# Expected values come from the fakes' own records, compared in SQL (truth.* tables loaded
# from the fakes' admin dumps with pg_read_file).
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
http_options(timeout => 120);    # admin() and load_truth's dumps of 20,000 records
my $creds = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $PAT = 'pat-na1-11111111-2222-3333-4444-555555555555';    # fake_hubspot's --private-app-token default
my $N_PROG = 20000;    # Contacts of fake A (sections 1, 2, 6)
my $N_X = 2000;        # Contacts of fake C (sections 3, 4, 5, 7)
my $N_HS = 1234;       # HubSpot contacts

# ---------------------------------------------------------------------------
# Helpers: the fakes' request logs (start_fake, admin, soql_of, wait_sql etc. are in SyncTest.pm)
# ---------------------------------------------------------------------------

my $listener;

END
{
	local $?;    # keep the test's exit status: reaping the listener sets $?
	eval { $listener->{h}->kill_kill(grace => 3) if $listener; };
}

# The fields a SOQL statement selects (a hash), or {}.
sub soql_fields
{
	my ($soql) = @_;
	return {} unless defined $soql && $soql =~ /^SELECT (.*?) FROM /;
	return { map { $_ => 1 } split /,/, $1 };
}

sub is_query_start { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/?$}; }
sub is_query_all   { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/queryAll/?$}; }

sub query_more
{
	return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/([A-Za-z0-9]+)-(\d+)$} ? ($1, $2) : ();
}

sub requests_sorted
{
	my ($fake) = @_;
	return [ sort { $a->{t} <=> $b->{t} } @{ admin($fake, 'GET', 'requests') } ];
}

# ---------------------------------------------------------------------------
# Helpers: the database
# ---------------------------------------------------------------------------

my $node;
my $tmpdir = PostgreSQL::Test::Utils::tempdir();

# psql that may fail: (exit code, stdout, stderr), errors with their SQLSTATE.
sub psql_try
{
	my ($query) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql('postgres', "\\set VERBOSITY verbose\n$query", stdout => \$out, stderr => \$err);
	return ($rc, $out, $err);
}

# The collection_state of a source's one collection, as a hash.
sub cstate { return row('SELECT st.* ' . state_where($_[0])); }

sub state_where { return "FROM sync.collection_state st JOIN sync.collections c ON c.id = st.collection_id "
	  . "JOIN sync.sources s ON s.id = c.source_id WHERE s.name = '$_[0]'"; }

# Wait until a column backfill of (at least) $fields (a JSON array text) started after $since
# completed, then check that it filled exactly those fields.
sub wait_column_backfill
{
	my ($source, $fields, $since, $timeout, $label) = @_;
	my $done = wait_sql($timeout,
		"SELECT st.column_backfill IS NULL AND st.last_column_backfill->'fields' @> '$fields'::jsonb "
		  . "AND (st.last_column_backfill->>'completed_at')::timestamptz >= '$since'::timestamptz "
		  . state_where($source));
	ok($done, "$label: a column backfill of $fields completes");
	is(sql("SELECT st.last_column_backfill->'fields' " . state_where($source)), $fields,
		"$label: the column backfill filled $fields only");
	return $done;
}

# The fake's records of an object in table truth.<name> (id, rec jsonb); returns the count.
sub load_truth
{
	my ($fake, $object, $name) = @_;
	my $file = "$tmpdir/$name.json";
	open(my $fh, '>:raw', $file) or die "cannot write $file: $!";
	my $res = http()->request('GET', "$fake->{url}/__admin/records/$object",
		{ data_callback => sub { print $fh $_[0]; } });
	close($fh);
	die "records of $object: $res->{status}" unless $res->{success};
	sql("SET client_min_messages = warning; DROP TABLE IF EXISTS truth.$name; "
		  . "CREATE TABLE truth.$name AS SELECT r->>'Id' AS id, r AS rec "
		  . "FROM jsonb_array_elements(pg_read_file('$file')::jsonb) r; "
		  . "ALTER TABLE truth.$name ADD PRIMARY KEY (id)");
	return sql("SELECT count(*) FROM truth.$name");
}

# Rows of $table that differ from truth.$truth by id or by one of the column => expression
# pairs (expression over f.rec); returns (count, first few as text).
sub diff_rows
{
	my ($table, $truth, %cols) = @_;
	my @c = sort keys %cols;
	my $cond = join(' OR ', map { "t.$_ IS DISTINCT FROM ($cols{$_})" } @c);
	my $from = "FROM $table t FULL JOIN truth.$truth f ON f.id = t.id WHERE t.id IS NULL OR f.id IS NULL OR $cond";
	my $n = sql("SELECT count(*) $from");
	return ($n, '') unless $n;
	my $line = "coalesce(t.id, f.id) || ': ' || " . join(" || ' / ' || ",
		map { "'$_ ' || coalesce(t.${_}::text, 'NULL') || ' vs ' || coalesce(($cols{$_})::text, 'NULL')" } @c);
	return ($n, sql("SELECT string_agg(line, E'\\n') FROM (SELECT $line AS line $from LIMIT 5) z"));
}

# A listening session: notifications on sync_backfill_completed, read back with a round trip.
sub listener_start
{
	my %l = (in => '', out => '', err => '', n => 0);
	$l{timer} = IPC::Run::timeout(120);
	$l{h} = IPC::Run::start(
		[ $node->installed_command('psql'), '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres') ],
		'<', \$l{in}, '>', \$l{out}, '2>', \$l{err}, $l{timer});
	$l{in} .= "LISTEN sync_backfill_completed;\n";
	listener_sync(\%l);
	return \%l;
}

sub listener_sync
{
	my ($l) = @_;
	my $tag = 'tick_' . ++$l->{n};
	$l->{timer}->reset;
	$l->{timer}->start(120);
	$l->{in} .= "SELECT '$tag';\n";
	$l->{h}->pump until $l->{out} =~ /^\Q$tag\E$/m;
	return;
}

# Every notification so far: [{payload...}, ...]. psql prints the notifications it read
# with a query after that query's result: the second round trip brings them all.
sub notifications
{
	my ($l) = @_;
	listener_sync($l);
	listener_sync($l);
	my @n;
	while ($l->{out} =~ /^Asynchronous notification "sync_backfill_completed" with payload "(.*)" received from server process with PID \d+\.$/mg)
	{
		push @n, $json->decode($1);
	}
	return \@n;
}

# Notifications of column backfills of $table that filled $field.
sub column_notifications
{
	my ($table, $field) = @_;
	return [ grep { $_->{table} eq $table && ref($_->{columns}) eq 'ARRAY' && grep({ $_ eq $field } @{ $_->{columns} }) }
		  @{ notifications($listener) } ];
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

my $A = start_fake('salesforce', 'sf_a', { timeout => 120 }, '--records', $N_PROG, '--seed', 1);
my $C = start_fake('salesforce', 'sf_c', { timeout => 120 }, '--records', $N_X, '--seed', 3);
my $H = start_fake('hubspot', 'hs', { timeout => 120 }, '--contacts', $N_HS, '--archived', 7, '--seed', 4);

$node = start_node(max_backoff => 4, initdb_extra => [ '--encoding=UTF8', '--locale=C' ]);    # and CREATE EXTENSION sync
sql('CREATE SCHEMA truth');
$listener = listener_start();
note('setup done at ' . elapsed());

# ---------------------------------------------------------------------------
# 1. Progress of a backfill: 20,000 Contacts at 3 requests/s in pages of 200
# ---------------------------------------------------------------------------

sql("SELECT sync.create_source('prog', 'salesforce', '$A->{url}', '$creds', "
	  . "'{\"requests_per_second\": 3, \"batch_size\": 200, \"poll_interval\": 1}')");
is(sql("SELECT sync.add_collection('prog', 'Contact')"), 'prog.contact', 'add_collection creates prog.contact');

# sync.wait_for_backfill in another session, from the start
my ($wait_out, $wait_err) = ('', '');
my $waiter = IPC::Run::start(
	[ $node->installed_command('psql'), '-XAtq', '-d', $node->connstr('postgres'), '-c',
	  "SELECT sync.wait_for_backfill('prog', 'Contact', '200s') || '|' || extract(epoch FROM clock_timestamp())" ],
	'<', \undef, '>', \$wait_out, '2>', \$wait_err, IPC::Run::timeout(260));

my @samples;
{
	my $deadline = time + 200;
	while (time < $deadline)
	{
		my $s = $json->decode(sql(
			"SELECT row_to_json(x) FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS at, phase, state, "
			  . "backfill_records AS records, backfill_total AS total, backfill_percent AS percent, "
			  . "backfill_rate AS rate, extract(epoch FROM backfill_eta)::float8 AS eta, "
			  . "extract(epoch FROM backfill_started_at)::float8 AS started, "
			  . "extract(epoch FROM backfill_completed_at)::float8 AS completed "
			  . "FROM sync.status WHERE source = 'prog' AND collection = 'Contact') x"));
		push @samples, $s;
		last if $s->{phase} eq 'incremental';
		usleep(500_000);
	}
}
my $last = $samples[-1];
note('first samples: ' . join(' ', map { $json->encode($_) } @samples[ 0 .. ($#samples < 5 ? $#samples : 5) ]));
is($last->{phase}, 'incremental', 'prog: the backfill completed (sampled until then)');
my @run = grep { $_->{phase} eq 'backfill' && $_->{records} > 0 } @samples;
note(sprintf('prog backfill: %d samples, %d while running; done at %s', scalar(@samples), scalar(@run), elapsed()));
cmp_ok(scalar(@run), '>=', 20, 'progress: at least 20 samples taken while the backfill ran');

is(join(',', sort keys %{ { map { ($_->{total} // 'null') => 1 } @run } }), $N_PROG,
	"progress: backfill_total = $N_PROG (the fake's count) in every sample once records arrive");
is($last->{total}, $N_PROG, "progress: backfill_total = $N_PROG at completion");
is($last->{records}, $N_PROG, "progress: backfill_records = $N_PROG at completion");
is($last->{percent} + 0, 100, 'progress: backfill_percent = 100 at completion');
ok(!defined $last->{eta}, 'progress: no backfill_eta once done');
{
	my (@decrease, @slow, @pct_bad);
	my @known = grep { defined $_->{total} } @samples;    # (before the first page: see section 1c)
	for my $i (1 .. $#known)
	{
		my ($p, $s) = @known[ $i - 1, $i ];
		push @decrease, "records $p->{records} -> $s->{records}" if $s->{records} < $p->{records};
		push @decrease, "percent $p->{percent} -> $s->{percent}"
		  if ($s->{percent} // 0) < ($p->{percent} // 0);
	}
	# strictly increasing over any 3 s (one page every 1/3 s)
	for my $i (0 .. $#known)
	{
		my ($j) = grep { $known[$_]{at} >= $known[$i]{at} + 3 } $i + 1 .. $#known;
		next unless defined $j;
		push @slow, sprintf('%.1fs: records %d -> %d, percent %s -> %s', $known[$i]{at} - $samples[0]{at},
			$known[$i]{records}, $known[$j]{records}, $known[$i]{percent} // 'null', $known[$j]{percent})
		  unless $known[$j]{records} > $known[$i]{records}
		  && ($known[$j]{percent} // 0) > ($known[$i]{percent} // 0);
	}
	for my $s (@run)
	{
		my $want = sprintf('%.1f', 100 * $s->{records} / $N_PROG);
		push @pct_bad, "records $s->{records}: percent $s->{percent}, want $want"
		  unless defined $s->{percent} && abs($s->{percent} - $want) < 0.051;
	}
	cmp_ok(scalar(@known), '>=', scalar(@samples) - 3, 'progress: the total is known from the first page on');
	is(scalar(@decrease), 0, 'progress: backfill_records and backfill_percent never go down between samples')
	  or diag(join("\n", @decrease));
	is(scalar(@slow), 0, 'progress: backfill_records and backfill_percent strictly increase over every 3 s')
	  or diag(join("\n", @slow));
	my %distinct = map { $_->{records} => 1 } @run;
	cmp_ok(scalar(keys %distinct), '>=', 20, 'progress: at least 20 distinct backfill_records values seen');
	is(scalar(@pct_bad), 0, 'progress: backfill_percent = 100 * records / total while running')
	  or diag(join("\n", @pct_bad[ 0 .. ($#pct_bad < 9 ? $#pct_bad : 9) ]));
}
{
	# rate: 3 pages of 200 a second = 600 records/s, within a factor 2. The rate is measured
	# over a window of at least 2 s (one page's interval is noise), so it is known from about
	# 1,200 records on; before that it is null, never a wild number.
	my @rated = grep { $_->{records} >= 2000 } @run;
	my @bad = grep { !defined $_->{rate} || $_->{rate} < 300 || $_->{rate} > 1200 } @rated;
	my @early_bad = grep { $_->{records} < 2000 && defined $_->{rate} && ($_->{rate} < 300 || $_->{rate} > 1200) } @run;
	cmp_ok(scalar(@rated), '>=', 15, 'rate: at least 15 samples after 2,000 records');
	is(scalar(@bad), 0, 'rate: backfill_rate within a factor 2 of 600 records/s in every sample after 2,000 records')
	  or diag(join("\n", map { "records $_->{records}: rate " . ($_->{rate} // 'null') } @bad));
	is(scalar(@early_bad), 0, 'rate: before that, backfill_rate is null or within a factor 2 as well')
	  or diag(join("\n", map { "records $_->{records}: rate $_->{rate}" } @early_bad));
	note('rate samples: ' . join(' ', map { $_->{rate} // 'null' } @run));
	my @no_eta = grep { !defined $_->{eta} || $_->{eta} <= 0 } @rated;
	is(scalar(@no_eta), 0, 'eta: backfill_eta is set (and positive) in every sample after 2,000 records')
	  or diag(join("\n", map { "records $_->{records}: eta " . ($_->{eta} // 'null') } @no_eta));

	# decreasing overall: least-squares slope of eta over time near -1 s/s, and first > middle > last
	my @e = grep { defined $_->{eta} } @rated;
	if (@e >= 5)
	{
		my ($n, $sx, $sy, $sxx, $sxy) = (scalar(@e), 0, 0, 0, 0);
		for my $s (@e)
		{
			my $x = $s->{at} - $e[0]{at};
			$sx += $x; $sy += $s->{eta}; $sxx += $x * $x; $sxy += $x * $s->{eta};
		}
		my $slope = ($n * $sxy - $sx * $sy) / ($n * $sxx - $sx * $sx);
		ok($slope < -0.5 && $slope > -2, sprintf('eta: falls about one second per second (slope %.2f)', $slope));
		my $mid = $e[ int($#e / 2) ];
		ok($e[0]{eta} > $mid->{eta} && $mid->{eta} > $e[-1]{eta},
			sprintf('eta: first %.1fs > middle %.1fs > last %.1fs', $e[0]{eta}, $mid->{eta}, $e[-1]{eta}));
	}
	else
	{
		fail('eta: too few samples with an eta');
	}
	my ($half) = grep { $_->{records} >= $N_PROG / 2 } @run;
	ok(defined $half && defined $half->{eta}, 'eta: a sample after half-way has an eta');
	if (defined $half && defined $half->{eta} && defined $last->{completed})
	{
		my $actual = $last->{completed} - $half->{at};
		ok($half->{eta} >= $actual / 2 && $half->{eta} <= $actual * 2,
			sprintf('eta: at %d records it predicted %.1fs, the rest took %.1fs (within a factor 2)',
				$half->{records}, $half->{eta}, $actual));
	}
	else
	{
		fail('eta: no half-way prediction to check');
	}
}
ok(defined $last->{started} && defined $last->{completed} && $last->{completed} > $last->{started},
	'progress: backfill_started_at and backfill_completed_at set, in order');
{
	my $took = ($last->{completed} // 0) - ($last->{started} // 0);
	note(sprintf('prog backfill: %.1fs from started_at to completed_at, %.0f records/s', $took,
		$took > 0 ? $N_PROG / $took : 0));
	cmp_ok($took, '>=', 25, 'progress: 100 pages at 3 requests/s took at least 25 s (the budget holds)');
	cmp_ok($took, '<=', 150, 'progress: and at most 150 s');
}
{
	eval { $waiter->finish; };
	chomp $wait_out;
	my ($ret, $at) = split /\|/, $wait_out;
	is($ret, 'true', 'wait_for_backfill (called at the start, in another session) returns true')
	  or diag("stdout: $wait_out stderr: $wait_err");
	ok(defined $at && defined $last->{completed} && $at >= $last->{completed} && $at <= $last->{completed} + 5,
		'wait_for_backfill returned within 5 s after completion')
	  or diag("returned at " . ($at // 'undef') . ", completed at " . ($last->{completed} // 'undef'));
}
is(sql('SELECT count(*) FROM prog.contact'), $N_PROG, "prog.contact holds $N_PROG rows");
sql("SELECT sync.pause('prog')");

# The other collections start now: HubSpot (1b) and x (sections 3-5, 7, on fake C).
# 1c. x is added while its source is paused: before its first page the total is not known.
sql("SELECT sync.create_source('x', 'salesforce', '$C->{url}', '$creds', "
	  . "'{\"requests_per_second\": 20, \"batch_size\": 500, \"poll_interval\": 0.5, \"schema_interval\": 2}')");
sql("SELECT sync.pause('x')");
is(sql("SELECT sync.add_collection('x', 'Contact', "
	  . "'{\"fields\": [\"FirstName\", \"LastName\", \"Title\", \"Engagement_Score__c\", \"Visit_Count__c\"]}')"),
	'x.contact', 'add_collection creates x.contact with some fields');
is(sql("SELECT phase || ',' || backfill_records || ',' || coalesce(backfill_total::text, 'null') || ',' "
	  . "|| coalesce(backfill_percent::text, 'null') || ',' || coalesce(backfill_eta::text, 'null') FROM sync.status WHERE source = 'x'"),
	'backfill,0,null,null,null', 'before the first page: no total, so no backfill_percent (not 100) and no eta');
sql("SELECT sync.resume('x')");

# ---------------------------------------------------------------------------
# 1b. HubSpot: the total comes from a one-result search
# ---------------------------------------------------------------------------

admin($H, 'DELETE', 'requests');
sql("SELECT sync.create_source('hs', 'hubspot', '$H->{url}', '{\"access_token\": \"$PAT\"}', "
	  . "'{\"requests_per_second\": 5, \"poll_interval\": 1}')");
is(sql("SELECT sync.add_collection('hs', 'contacts')"), 'hs.contacts', 'add_collection creates hs.contacts');
my @hs;
{
	my $deadline = time + 120;
	while (time < $deadline)
	{
		my $s = $json->decode(sql(
			"SELECT row_to_json(x) FROM (SELECT phase, backfill_records AS records, backfill_total AS total, "
			  . "backfill_percent AS percent, extract(epoch FROM backfill_eta)::float8 AS eta "
			  . "FROM sync.status WHERE source = 'hs') x"));
		push @hs, $s;
		last if $s->{phase} eq 'incremental';
		usleep(250_000);
	}
}
{
	my $stats = admin($H, 'GET', 'stats');
	is($stats->{records}{contacts}, $N_HS, "the HubSpot fake holds $N_HS live contacts (and 7 archived)");
	is($hs[-1]{phase}, 'incremental', 'hs: the backfill completed');
	is($hs[-1]{total}, $stats->{records}{contacts}, "hs: backfill_total = the fake's contact count");
	is($hs[-1]{records}, $N_HS, "hs: backfill_records = $N_HS");
	is($hs[-1]{percent} + 0, 100, 'hs: backfill_percent = 100');
	my @mid = grep { $_->{phase} eq 'backfill' && $_->{records} > 0 } @hs;
	ok(@mid >= 1, 'hs: sampled while the backfill ran (' . scalar(@mid) . ' samples)');
	is(scalar(grep { ($_->{total} // -1) != $N_HS || $_->{percent} != sprintf('%.1f', 100 * $_->{records} / $N_HS) } @mid),
		0, "hs: while running, backfill_total = $N_HS and percent = records / total");
	my $log = [ sort { $a->{t} <=> $b->{t} } @{ admin($H, 'GET', 'requests') } ];
	my ($first_search) = grep { $_->{path} eq '/crm/v3/objects/contacts/search' } @$log;
	my ($first_list) = grep { $_->{path} eq '/crm/v3/objects/contacts' } @$log;
	ok($first_search && $first_list && $first_search->{t} <= $first_list->{t}
		  && ($first_search->{body}{limit} // 0) == 1,
		'hs: a one-result search came before the first list page');
}
sql("SELECT sync.pause('hs')");
note('HubSpot done at ' . elapsed());

# ---------------------------------------------------------------------------
# 2. ALTER TABLE ADD COLUMN on a collection synced with some fields (fake A)
#    (with 6a: a column backfill never overwrites a newer row)
# ---------------------------------------------------------------------------

admin($A, 'DELETE', 'requests');
sql("SELECT sync.create_source('cols', 'salesforce', '$A->{url}', '$creds', "
	  . "'{\"requests_per_second\": 20, \"batch_size\": 2000, \"poll_interval\": 1}')");
is(sql("SELECT sync.add_collection('cols', 'Contact', '{\"fields\": [\"FirstName\", \"LastName\"]}')"),
	'cols.contact', 'add_collection creates cols.contact with FirstName, LastName');
is(sql("SELECT sync.wait_for_backfill('cols', 'Contact', '180s')"), 't', 'cols: backfill completes');
is(sql("SELECT string_agg(attname, ',' ORDER BY attname) FROM pg_attribute "
	  . "WHERE attrelid = 'cols.contact'::regclass AND attnum > 0 AND NOT attisdropped"),
	'_synced_at,first_name,id,last_name,system_modstamp', 'cols.contact: only the key, the stamp and the two fields');
is(sql("SELECT synced::text || ',' || column_name || ',' || column_type FROM sync.available_fields "
	  . "WHERE source = 'cols' AND api_field = 'Email'"),
	'false,email,text', 'available_fields: Email listed, not synced, would be column email text');
{
	my @starts = grep { is_query_start($_) } @{ requests_sorted($A) };
	is(join(',', sort keys %{ soql_fields(soql_of($starts[0] // {})) }), 'FirstName,Id,LastName,SystemModstamp',
		'cols backfill query asks for the key, the stamp and the two fields only');
}
note('cols backfill done at ' . elapsed());

is(load_truth($A, 'Contact', 'a0'), $N_PROG, "fake A: $N_PROG Contacts loaded for comparison");
# walk order of a backfill: SystemModstamp, Id; records before a given one by stamp = its latest position
my %pick;
for my $p ([ 'R1', 50 ], [ 'R3', 100 ], [ 'R4', 150 ], [ 'Q', 200 ])
{
	my ($id, $stamp, $email) = split /\|/, sql(
		"SELECT id, rec->>'SystemModstamp', rec->>'Email' FROM truth.a0 WHERE rec->>'Email' IS NOT NULL "
		  . "ORDER BY rec->>'SystemModstamp', id COLLATE \"C\" OFFSET $p->[1] LIMIT 1");
	my $rank = sql("SELECT count(*) FROM truth.a0 WHERE rec->>'SystemModstamp' <= '$stamp'");
	$pick{ $p->[0] } = { id => $id, stamp => $stamp, email => $email, rank => $rank };
}
($pick{R2}{id}, $pick{R2}{stamp}) = split /\|/,
  sql("SELECT id, rec->>'SystemModstamp' FROM truth.a0 ORDER BY rec->>'SystemModstamp' DESC, id COLLATE \"C\" DESC LIMIT 1");
($pick{R5}{id}, $pick{R5}{stamp}) = split /\|/,
  sql("SELECT id, rec->>'SystemModstamp' FROM truth.a0 ORDER BY rec->>'SystemModstamp' DESC, id COLLATE \"C\" DESC OFFSET 1 LIMIT 1");
note(join(', ', map { "$_ = $pick{$_}{id} (stamp $pick{$_}{stamp}, walk position <= " . ($pick{$_}{rank} // '?') . ')' } sort keys %pick));
my ($R1, $R2, $R3, $R4, $R5, $Q) = map { $pick{$_}{id} } qw(R1 R2 R3 R4 R5 Q);

# 6a (setup): R3 changes (newer stamp, polled into the table), then the API shows an OLDER
# version of it (stamp set back, Email "stale"): the column backfill's page of R3 is older
# than the row, like a page read before the row was updated, and must not be applied.
admin($A, 'PATCH', "records/Contact/$R3", { Email => 'r3.newer@example.com', LastName => 'R3Newer' });
ok(wait_sql(60, "SELECT last_name = 'R3Newer' FROM cols.contact WHERE id = '$R3'"), 'R3: its update is polled in');
my $r3_row_stamp = sql("SELECT system_modstamp FROM cols.contact WHERE id = '$R3'");
admin($A, 'PATCH', "records/Contact/$R3?bump=0", { Email => 'r3.stale@example.com', SystemModstamp => $pick{R3}{stamp} });
is(admin($A, 'GET', "records/Contact/$R3")->{SystemModstamp}, $pick{R3}{stamp}, 'R3: the fake now shows its old stamp');

# a long column backfill: pages of 200 at 10 requests/s, alternating with polls
sql("SELECT sync.alter_source('cols', options => '{\"requests_per_second\": 10, \"batch_size\": 200}')");
my $before = cstate('cols');
admin($A, 'DELETE', 'requests');
my $t_alter = time;
my $alter_at = sql("BEGIN; ALTER TABLE cols.contact ADD COLUMN email text; SELECT now(); COMMIT;");
is(sql("SELECT synced::text || ',' || synced_as FROM sync.available_fields WHERE source = 'cols' AND api_field = 'Email'"),
	'true,email', 'ADD COLUMN email: available_fields shows Email synced as email');
is(sql("SELECT column_backfill->'fields' " . state_where('cols')), '["Email"]',
	'ADD COLUMN email: a column backfill of Email is under way');

my ($patched, $r1_seen, $r2_seen, @bad_state, $n_samples);
{
	my $deadline = time + 180;
	while (time < $deadline)
	{
		my $s = $json->decode(sql(
			"SELECT json_build_object('at', extract(epoch FROM clock_timestamp()), 'cb', st.column_backfill, "
			  . "'phase', st.phase, 'mode', st.cursor->>'mode', 'brec', st.backfill_records, "
			  . "'bdone', st.backfill_completed_at, 'bstart', st.backfill_started_at, "
			  . "'r1', (SELECT json_build_object('email', email, 'last_name', last_name) FROM cols.contact WHERE id = '$R1'), "
			  . "'r2', (SELECT last_name FROM cols.contact WHERE id = '$R2')) " . state_where('cols')));
		$n_samples++;
		push @bad_state, "phase $s->{phase}, cursor mode " . ($s->{mode} // 'null') . ", backfill_records $s->{brec}"
		  if $s->{phase} ne 'incremental' || ($s->{mode} // '') ne 'incremental' || $s->{brec} != $N_PROG
		  || $s->{bdone} ne $before->{backfill_completed_at} || $s->{bstart} ne $before->{backfill_started_at};
		if (!$patched && $s->{cb} && $s->{cb}{records} >= $pick{R1}{rank} + 200
			&& ($s->{r1}{email} // '') eq $pick{R1}{email})
		{
			# R1's page was applied (its email is there); R2 (end of the walk) is not read yet
			admin($A, 'PATCH', "records/Contact/$R1", { Email => 'r1.newer@example.com', LastName => 'R1Newer' });
			admin($A, 'PATCH', "records/Contact/$R2", { LastName => 'R2Polled' });
			$patched = { %$s, t => time };
		}
		$r2_seen //= $s if $patched && ($s->{r2} // '') eq 'R2Polled';
		$r1_seen //= $s if $patched && ($s->{r1}{last_name} // '') eq 'R1Newer';
		last unless $s->{cb};
		usleep(300_000);
	}
}
my $after = cstate('cols');
note(sprintf('column backfill of Email: %.1fs, %d samples, done at %s', time - $t_alter, $n_samples, elapsed()));
ok(!defined $after->{column_backfill}, 'the column backfill of Email completed');
ok($patched, 'R1 and R2 were updated in the fake while the column backfill ran (after R1\'s page)')
  or diag('no sample showed R1 filled while the column backfill ran');
ok($r2_seen && $r2_seen->{cb}, 'polling goes on: R2\'s new LastName arrived while the column backfill still ran'
	  . ($r2_seen && $r2_seen->{cb} ? " (at $r2_seen->{cb}{records} column records, "
		  . sprintf('%.1fs after the update)', $r2_seen->{at} - $patched->{t}) : ''));
ok($r1_seen && $r1_seen->{cb}, 'polling goes on: R1\'s update arrived while the column backfill still ran');
is(scalar(@bad_state), 0, "the collection stayed incremental, its backfill figures untouched ($n_samples samples)")
  or diag(join("\n", @bad_state[ 0 .. ($#bad_state < 9 ? $#bad_state : 9) ]));
is($after->{phase}, 'incremental', 'cols: phase incremental after the column backfill');
is($after->{backfill_records}, $N_PROG, "cols: backfill_records still $N_PROG");
is($after->{cursor}{mode}, 'incremental', 'cols: cursor not reset (mode incremental)');
ok(($after->{cursor}{ts} // '') ge ($before->{cursor}{ts} // 'x') && ($after->{cursor}{id} // '') ne '',
	"cols: the cursor's keyset did not go back ($before->{cursor}{ts} -> " . ($after->{cursor}{ts} // 'null') . ')');
is($after->{cursor}{deleted_until} >= $before->{cursor}{deleted_until} ? 1 : 0, 1, 'cols: the cursor kept its delete checkpoint');
is($after->{last_column_backfill}{records}, $N_PROG - 1,
	'last_column_backfill: every row updated but R3 (newer than its page)');
ok(defined $after->{last_column_backfill}{completed_at}, 'last_column_backfill: completed_at set');

# 6a: R1 updated after its page was read keeps the newer values; R3's older page was not applied
is(sql("SELECT email || ',' || last_name FROM cols.contact WHERE id = '$R1'"), 'r1.newer@example.com,R1Newer',
	'6a: R1 (updated after its column page was read) has the newer Email and LastName at the end');
is(sql("SELECT coalesce(email, 'NULL') || ',' || last_name || ',' || (system_modstamp = '$r3_row_stamp') FROM cols.contact WHERE id = '$R3'"),
	'NULL,R3Newer,true', '6a: R3\'s column page, older than the row, was not applied (no stale Email)');
is(sql("SELECT last_name FROM cols.contact WHERE id = '$R2'"), 'R2Polled', 'R2 keeps its polled LastName');

# the requests: one column backfill query (key, stamp, Email), its pages alternating with polls
{
	my $log = requests_sorted($A);
	my @starts = grep { is_query_start($_) } @$log;
	is(scalar(@starts), 1, 'one backfill query since the ALTER (the column backfill)');
	my $soql = soql_of($starts[0] // {}) // '';
	is(join(',', sort keys %{ soql_fields($soql) }), 'Email,Id,SystemModstamp',
		'column backfill query: the key, the stamp and Email only');
	like($soql, qr/ FROM Contact ORDER BY SystemModstamp, Id$/, 'column backfill query: no WHERE, ordered by SystemModstamp, Id');
	my @pages = grep { my @m = query_more($_); @m } @$log;
	is(scalar(@pages), $N_PROG / 200 - 1, 'column backfill: ' . ($N_PROG / 200 - 1) . ' more pages of 200');
	my ($t0, $t1) = ($starts[0]{t} // 0, @pages ? $pages[-1]{t} : 0);
	my @polls = grep { is_query_all($_) && $_->{t} > $t0 && $_->{t} < $t1 } @$log;
	cmp_ok(scalar(@polls), '>=', scalar(@pages) / 2, 'polls ran between the column pages (' . scalar(@polls) . ')');
	my @late = grep { is_query_all($_) && $_->{t} > $t_alter + 2 } @$log;
	my @no_email = grep { !soql_fields(soql_of($_))->{Email} } @late;
	ok(@late > 0 && @no_email == 0, 'polls since the ALTER ask for Email (' . scalar(@late) . ' polls)');
}
{
	my $n = column_notifications('cols.contact', 'Email');
	is(scalar(@$n), 1, 'NOTIFY sync_backfill_completed of the Email column backfill arrived once');
	is($json->encode($n->[0]{columns}), '["Email"]', 'the notification says "columns": ["Email"]') if @$n;
	is($n->[0]{records}, $N_PROG - 1, 'the notification counts the rows filled') if @$n;
	is($n->[0]{source} . '/' . $n->[0]{collection}, 'cols/Contact', 'the notification names source and collection') if @$n;
}

# every row's Email equals the fake's (R3 set right first)
admin($A, 'PATCH', "records/Contact/$R3", { Email => 'r3.final@example.com' });
ok(wait_sql(60, "SELECT email = 'r3.final\@example.com' FROM cols.contact WHERE id = '$R3'"), 'R3: a newer update is polled in');
is(load_truth($A, 'Contact', 'a1'), $N_PROG, 'fake A reloaded');
{
	my ($n, $show) = diff_rows('cols.contact', 'a1', email => "f.rec->>'Email'", first_name => "f.rec->>'FirstName'",
		last_name => "f.rec->>'LastName'", system_modstamp => "(f.rec->>'SystemModstamp')::timestamptz");
	is($n, 0, "cols.contact: all $N_PROG rows, by id, have the fake's Email, FirstName, LastName, SystemModstamp")
	  or diag($show);
	is(sql("SELECT count(*) FROM cols.contact WHERE email IS NOT NULL"),
		sql("SELECT count(*) FROM truth.a1 WHERE rec->>'Email' IS NOT NULL"), 'as many emails as the fake has');
}
usleep(2_000_000);
is(scalar(@{ column_notifications('cols.contact', 'Email') }), 1, 'still one notification for the Email backfill');

# ---------------------------------------------------------------------------
# 6b. A resync never overwrites a newer row
# ---------------------------------------------------------------------------

# Q: the row is newer than what the API shows (stamp set back): the resync page must not win.
admin($A, 'PATCH', "records/Contact/$Q", { LastName => 'QNewer' });
ok(wait_sql(60, "SELECT last_name = 'QNewer' FROM cols.contact WHERE id = '$Q'"), 'Q: its update is polled in');
my $q_row_stamp = sql("SELECT system_modstamp FROM cols.contact WHERE id = '$Q'");
admin($A, 'PATCH', "records/Contact/$Q?bump=0", { LastName => 'QStale', SystemModstamp => $pick{Q}{stamp} });

sql("SELECT sync.resync('cols', 'Contact')");
my ($r4_patched, $r5_patched);
{
	my $deadline = time + 120;
	while (time < $deadline)
	{
		my $s = cstate('cols');
		if (!$r5_patched && $s->{phase} eq 'backfill')
		{
			# R5 sits at the end of the walk: changed before its page is read
			admin($A, 'PATCH', "records/Contact/$R5", { LastName => 'R5BeforePage', FirstName => 'R5First' });
			$r5_patched = $s->{backfill_records};
		}
		if (!$r4_patched && $s->{phase} eq 'backfill' && $s->{backfill_records} >= $pick{R4}{rank} + 200)
		{
			# R4's page was read: changed afterwards, while the resync still runs
			admin($A, 'PATCH', "records/Contact/$R4", { LastName => 'R4AfterPage', FirstName => 'R4First' });
			$r4_patched = cstate('cols');
			last;
		}
		usleep(200_000);
	}
}
ok($r4_patched && $r4_patched->{phase} eq 'backfill',
	'R4 was updated after its resync page, while the resync still ran'
	  . ($r4_patched ? " (at $r4_patched->{backfill_records} records)" : ''));
ok(defined $r5_patched && $r5_patched < $N_PROG - 400, 'R5 was updated before the resync reached it');
is(sql("SELECT sync.wait_for_backfill('cols', 'Contact', '180s')"), 't', 'the resync completes');
ok(wait_sql(90, "SELECT last_name = 'R4AfterPage' AND first_name = 'R4First' FROM cols.contact WHERE id = '$R4'"),
	'6b: R4, updated after its resync page was read, has the newer values at the end');
is(sql("SELECT last_name || ',' || first_name FROM cols.contact WHERE id = '$R5'"), 'R5BeforePage,R5First',
	'6b: R5, updated before its page, has the newer values');
is(sql("SELECT last_name || ',' || (system_modstamp = '$q_row_stamp') FROM cols.contact WHERE id = '$Q'"), 'QNewer,true',
	'6b: Q\'s resync page, older than the row, did not overwrite it');
is(cstate('cols')->{backfill_records}, $N_PROG, "the resync read $N_PROG records");
is(load_truth($A, 'Contact', 'a2'), $N_PROG, 'fake A reloaded');
{
	sql("DELETE FROM truth.a2 WHERE id = '$Q'");
	my ($n, $show) = diff_rows("(SELECT * FROM cols.contact WHERE id <> '$Q')", 'a2', email => "f.rec->>'Email'",
		first_name => "f.rec->>'FirstName'", last_name => "f.rec->>'LastName'",
		system_modstamp => "(f.rec->>'SystemModstamp')::timestamptz");
	is($n, 0, 'after the resync every other row equals the fake') or diag($show);
}
sql("SELECT sync.pause('cols')");
note('section 6b done at ' . elapsed());

# ---------------------------------------------------------------------------
# 3. A column's type changes: it is read again in the new type (fake C)
# ---------------------------------------------------------------------------

is(sql("SELECT sync.wait_for_backfill('x', 'Contact', '120s')"), 't', 'x: backfill completes');
is(load_truth($C, 'Contact', 'c0'), $N_X, "fake C: $N_X Contacts");
is(sql("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'x.contact'::regclass "
	  . "AND attname = 'engagement_score__c'"), 'numeric(5,1)', 'x.contact.engagement_score__c is numeric(5,1)');
my $n_scores = sql("SELECT count(*) FROM truth.c0 WHERE rec->>'Engagement_Score__c' IS NOT NULL");
cmp_ok($n_scores, '>', 100, "the fake has $n_scores Engagement_Score__c values");
{
	my ($at, $left) = split /\|/, sql("BEGIN; ALTER TABLE x.contact ALTER COLUMN engagement_score__c TYPE text USING NULL; "
		  . "SELECT now() || '|' || count(engagement_score__c) FROM x.contact; COMMIT;");
	is($left, 0, 'ALTER COLUMN ... TYPE text USING NULL empties the column');
	is(sql("SELECT column_type FROM sync.columns WHERE source = 'x' AND api_field = 'Engagement_Score__c'"), 'text',
		'sync.columns: Engagement_Score__c is now text');
	wait_column_backfill('x', '["Engagement_Score__c"]', $at, 90, 'TYPE text');
	my ($n, $show) = diff_rows('x.contact', 'c0', 'engagement_score__c::numeric' => "(f.rec->>'Engagement_Score__c')::numeric");
	is($n, 0, 'every engagement_score__c is the fake\'s number, as text') or diag($show);
	# the API's own text of the number: 30.0 stays "30.0"
	($n, $show) = diff_rows('x.contact', 'c0', engagement_score__c => "f.rec->>'Engagement_Score__c'");
	is($n, 0, 'every engagement_score__c is the text the API sent (30.0 stays 30.0)') or diag($show);
}
{
	# sync.alter_column: a value that does not cast makes it read the column again from NULL
	my ($T1, $T2) = split /\n/, sql("SELECT id FROM x.contact WHERE engagement_score__c IS NOT NULL "
		  . "AND visit_count__c IS NOT NULL ORDER BY id LIMIT 2");
	sql("UPDATE x.contact SET engagement_score__c = 'not a number' WHERE id = '$T1'");
	my $at = sql('SELECT now()');
	sql("SELECT sync.alter_column('x', 'Contact', 'engagement_score__c', 'numeric(6,2)')");
	is(sql("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'x.contact'::regclass "
		  . "AND attname = 'engagement_score__c'"), 'numeric(6,2)', 'alter_column: engagement_score__c is numeric(6,2)');
	wait_column_backfill('x', '["Engagement_Score__c"]', $at, 90, 'alter_column');
	my ($n, $show) = diff_rows('x.contact', 'c0', engagement_score__c => "(f.rec->>'Engagement_Score__c')::numeric");
	is($n, 0, 'alter_column: every engagement_score__c equals the fake\'s (the damaged one too)') or diag($show);

	# a cast that works: the values are still read again from the API
	my $v = sql("SELECT rec->>'Visit_Count__c' FROM truth.c0 WHERE id = '$T2'");
	sql("UPDATE x.contact SET visit_count__c = -1 WHERE id = '$T2'");
	$at = sql('SELECT now()');
	sql("SELECT sync.alter_column('x', 'Contact', 'visit_count__c', 'bigint')");
	wait_column_backfill('x', '["Visit_Count__c"]', $at, 90, 'alter_column to bigint');
	is(sql("SELECT visit_count__c FROM x.contact WHERE id = '$T2'"), $v, 'alter_column to bigint: the damaged value is the fake\'s again');
	($n, $show) = diff_rows('x.contact', 'c0', visit_count__c => "(f.rec->>'Visit_Count__c')::bigint");
	is($n, 0, 'alter_column to bigint: every visit_count__c equals the fake\'s') or diag($show);
}
note('section 3 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 4. sync.add_column(), and a field that appears in the API later
# ---------------------------------------------------------------------------

{
	my $at = sql('SELECT now()');
	is(sql("SELECT sync.add_column('x', 'Contact', 'Phone')"), 'phone', "add_column('Phone') returns the column name");
	is(sql("SELECT synced::text || ',' || synced_as FROM sync.available_fields WHERE source = 'x' AND api_field = 'Phone'"),
		'true,phone', 'available_fields: Phone synced as phone');
	wait_column_backfill('x', '["Phone"]', $at, 90, 'add_column');
	my ($n, $show) = diff_rows('x.contact', 'c0', phone => "f.rec->>'Phone'");
	is($n, 0, 'add_column: every phone equals the fake\'s') or diag($show);
	cmp_ok(sql("SELECT count(phone) FROM x.contact"), '>', 100, 'add_column: phones were filled');
}
{
	my $t_field = sql('SELECT now()');
	my $t0 = time;
	admin($C, 'POST', 'fields/Contact', { name => 'Shoe_Size__c', type => 'double', precision => 4, scale => 1 });
	my @ids = split /\n/, sql("SELECT id FROM truth.c0 ORDER BY id COLLATE \"C\" DESC LIMIT 25");
	my $i = 0;
	for my $id (@ids)
	{
		# bump=0: the stamp stays, so no poll sees these values; only a backfill does
		admin($C, 'PATCH', "records/Contact/$id?bump=0", { Shoe_Size__c => 35 + ($i++) * 0.5 });
	}
	ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM sync.available_fields WHERE source = 'x' AND api_field = 'Shoe_Size__c')"),
		sprintf('available_fields lists Shoe_Size__c (schema_interval 2), %.1fs after the field was added', time - $t0));
	is(sql("SELECT synced::text || ',' || api_type || ',' || column_name || ',' || column_type || ',' "
		  . "|| (first_seen_at >= '$t_field') || ',' || (synced_as IS NULL) "
		  . "FROM sync.available_fields WHERE source = 'x' AND api_field = 'Shoe_Size__c'"),
		'false,double,shoe_size__c,numeric(4,1),true,true',
		'Shoe_Size__c: not synced, double -> numeric(4,1), first_seen_at set since the field was added');
	my ($at, $out) = ('', '');
	$at = sql("BEGIN; ALTER TABLE x.contact ADD COLUMN shoe_size__c numeric; SELECT now(); COMMIT;");
	wait_column_backfill('x', '["Shoe_Size__c"]', $at, 90, 'ADD COLUMN shoe_size__c');
	is(load_truth($C, 'Contact', 'c1'), $N_X, 'fake C reloaded');
	my ($n, $show) = diff_rows('x.contact', 'c1', shoe_size__c => "(f.rec->>'Shoe_Size__c')::numeric");
	is($n, 0, 'every shoe_size__c equals the fake\'s') or diag($show);
	is(sql("SELECT string_agg(shoe_size__c::numeric(4,1)::text, ',' ORDER BY id COLLATE \"C\" DESC) FROM x.contact WHERE shoe_size__c IS NOT NULL"),
		join(',', map { sprintf('%.1f', 35 + $_ * 0.5) } 0 .. 24), 'the 25 shoe sizes set without a stamp change are there');
}
note('section 4 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 5. Removing, renaming, a column that names no field
# ---------------------------------------------------------------------------

# Polls that arrive from now on: their fields.
sub next_polls
{
	my ($fake, $n) = @_;
	admin($fake, 'DELETE', 'requests');
	my @polls;
	wait_until(60, sub { @polls = grep { is_query_all($_) } @{ requests_sorted($fake) }; @polls >= $n; });
	return [ map { soql_fields(soql_of($_)) } @polls ];
}

# Run $ddl while a poll of x is in flight (held 4 s by the fake) whose page holds a record
# changed to FirstName = $name; returns how many errors x recorded meanwhile, and its last_error.
sub ddl_during_poll
{
	my ($ddl, $name, $column) = @_;
	my $errors = sql("SELECT errors FROM sync.stat_collections WHERE source = 'x'");
	my $id = sql("SELECT id FROM truth.c0 ORDER BY id COLLATE \"C\" OFFSET 3 LIMIT 1");
	admin($C, 'PATCH', "records/Contact/$id", { FirstName => $name });
	my $fault = admin($C, 'POST', 'faults', { path_regex => '/queryAll', delay => 4, count => 1 });
	ok(wait_until(30, sub { grep { $_->{id} eq $fault->{id} && $_->{hits} >= 1 } @{ admin($C, 'GET', 'faults') } }),
		"$ddl: a poll is in flight (held by the fake)");
	sql($ddl);
	# two polls logged from now on: the one in flight finished and its outcome was recorded
	next_polls($C, 2);
	ok(wait_sql(60, "SELECT $column = '$name' FROM x.contact WHERE id = '$id'"), "$ddl: the changed record arrives");
	return (sql("SELECT errors FROM sync.stat_collections WHERE source = 'x'") - $errors,
		sql("SELECT last_error FROM sync.status WHERE source = 'x'"));
}

{
	my $p = next_polls($C, 2);
	ok(@$p >= 2 && !grep({ !$_->{Title} || !$_->{Phone} } @$p), 'before: polls name Title and Phone');
	# remove_column while a poll that asked for Title is in flight
	my ($errors, $last_error) = ddl_during_poll("SELECT sync.remove_column('x', 'Contact', 'title')", 'InFlight1', 'first_name');
	is($errors, 0, 'remove_column while a poll is in flight: the poll records no error')
	  or diag("last_error: $last_error");
	my ($rc, $out, $err) = psql_try('ALTER TABLE x.contact DROP COLUMN phone');
	is($rc, 0, 'ALTER TABLE DROP COLUMN phone works') or diag($err);
	is(sql("SELECT string_agg(api_field, ',' ORDER BY api_field) FROM sync.columns WHERE source = 'x' AND api_field IN ('Title', 'Phone')"),
		'', 'sync.columns no longer lists Title and Phone');
	is(sql("SELECT string_agg(api_field || ':' || synced, ',' ORDER BY api_field) FROM sync.available_fields "
		  . "WHERE source = 'x' AND api_field IN ('Title', 'Phone')"), 'Phone:false,Title:false',
		'available_fields: Title and Phone not synced');
	next_polls($C, 2);    # a poll that read its fields before the drop may still arrive
	$p = next_polls($C, 3);
	is(scalar(grep { $_->{Title} || $_->{Phone} } @$p), 0, 'the next polls name neither Title nor Phone (' . scalar(@$p) . ' polls)');
	ok(@$p >= 3 && !grep({ !$_->{LastName} || !$_->{Shoe_Size__c} } @$p), 'and still name LastName and Shoe_Size__c');
}
{
	my $count = sql('SELECT count(*) FROM x.contact');
	for my $col (qw(id system_modstamp))
	{
		my ($rc, $out, $err) = psql_try("ALTER TABLE x.contact DROP COLUMN $col");
		isnt($rc, 0, "DROP COLUMN $col fails");
		like($err, qr/ERROR:\s+2BP01:/, "DROP COLUMN $col: SQLSTATE 2BP01") or diag($err);
		($rc, $out, $err) = psql_try("SELECT sync.remove_column('x', 'Contact', '$col')");
		like($err, qr/ERROR:\s+2BP01:/, "remove_column('$col'): SQLSTATE 2BP01") or diag($err);
	}
	is(sql("SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attname) FROM pg_attribute "
		  . "WHERE attrelid = 'x.contact'::regclass AND attname IN ('id', 'system_modstamp') AND NOT attisdropped"),
		'id:text,system_modstamp:timestamp with time zone', 'the key and the stamp columns are still there');
	is(sql("SELECT count(*) FROM pg_index WHERE indrelid = 'x.contact'::regclass AND indisprimary"), 1, 'the primary key is still there');
	is(sql('SELECT count(*) FROM x.contact'), $count, 'no row lost');
	is(sql("SELECT string_agg(api_field, ',' ORDER BY api_field) FROM sync.columns WHERE source = 'x' AND (is_key OR is_version)"),
		'Id,SystemModstamp', 'sync.columns still has Id and SystemModstamp');
}
{
	my ($rc, $out, $err) = psql_try('ALTER TABLE prog.contact ALTER COLUMN title SET STATISTICS 50');
	is($rc, 0, 'ALTER TABLE prog.contact ... SET STATISTICS works') or diag($err);
	is(sql("SELECT coalesce(column_backfill->>'fields', 'none') " . state_where('prog')), 'none',
		'an ALTER TABLE that changes no synced column starts no column backfill');
}
my $U1 = sql("SELECT id FROM truth.c0 ORDER BY id COLLATE \"C\" OFFSET 7 LIMIT 1");
{
	# renamed while a poll that writes first_name is in flight
	my ($errors, $last_error) = ddl_during_poll('ALTER TABLE x.contact RENAME COLUMN first_name TO given_name',
		'InFlight2', 'given_name');
	is($errors, 0, 'RENAME COLUMN while a poll is in flight: the poll records no error')
	  or diag("last_error: $last_error");
	is(sql("SELECT column_name FROM sync.columns WHERE source = 'x' AND api_field = 'FirstName'"), 'given_name',
		'sync.columns follows the rename');
	admin($C, 'PATCH', "records/Contact/$U1", { FirstName => 'Renamed' });
	ok(wait_sql(60, "SELECT given_name = 'Renamed' FROM x.contact WHERE id = '$U1'"),
		'a renamed column stays filled: the new FirstName arrives in given_name');
}
{
	my ($rc, $out, $err) = psql_try('ALTER TABLE x.contact ADD COLUMN my_notes text');
	is($rc, 0, 'ADD COLUMN my_notes works') or diag($err);
	like($err, qr/NOTICE:.*column my_notes of x\.contact is not filled by sync/, 'a column that names no field: NOTICE')
	  or diag($err);
	($rc, $out, $err) = psql_try('ALTER TABLE x.contact ALTER COLUMN my_notes SET STATISTICS 50');
	unlike($err, qr/my_notes/, 'the NOTICE comes once (not on the next ALTER TABLE)');
	admin($C, 'PATCH', "records/Contact/$U1", { FirstName => 'AfterNotes', Title => 'Not synced' });
	ok(wait_sql(60, "SELECT given_name = 'AfterNotes' FROM x.contact WHERE id = '$U1'"), 'changes keep arriving');
	is(sql('SELECT count(my_notes) FROM x.contact'), 0, 'my_notes stays null');
	is(sql("SELECT count(*) FROM sync.columns WHERE source = 'x' AND column_name = 'my_notes'"), 0, 'my_notes is not in sync.columns');
}
note('section 5 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 7. Values that do not fit: a narrowed column
# ---------------------------------------------------------------------------

my $x_errors;
{
	$x_errors = sql("SELECT errors FROM sync.stat_collections WHERE source = 'x'");
	is(load_truth($C, 'Contact', 'c2'), $N_X, 'fake C reloaded');
	my $long = sql("SELECT count(*) FROM truth.c2 WHERE char_length(rec->>'LastName') > 5");
	cmp_ok($long, '>', 100, "$long LastNames are longer than 5 characters");
	my $at = sql("BEGIN; ALTER TABLE x.contact ALTER COLUMN last_name TYPE varchar(5) USING left(last_name, 5); SELECT now(); COMMIT;");
	wait_column_backfill('x', '["LastName"]', $at, 120, 'narrowing last_name');
	my ($n, $show) = diff_rows('x.contact', 'c2',
		last_name => "CASE WHEN char_length(f.rec->>'LastName') <= 5 THEN f.rec->>'LastName' END");
	is($n, 0, 'every last_name is the fake\'s when it fits, else null') or diag($show);
	is(sql("SELECT count(*) FROM sync.rejected WHERE source = 'x'"), $long, "sync.rejected lists $long values");
	my $bad = sql("SELECT count(*) FROM sync.rejected r FULL JOIN (SELECT * FROM truth.c2 WHERE char_length(rec->>'LastName') > 5) f "
		  . "ON f.id = r.record_id WHERE r.source = 'x' AND (f.id IS NULL OR r.api_field <> 'LastName' OR r.column_name <> 'last_name' "
		  . "OR r.value IS DISTINCT FROM f.rec->>'LastName' OR r.sqlstate <> '22001' OR r.record_dropped OR r.collection <> 'Contact' "
		  . "OR r.target_table::text <> 'x.contact') OR r.record_id IS NULL");
	is($bad, 0, 'each rejected value: its record, LastName, last_name, the API value, 22001, row kept');
	my $st = $json->decode(sql("SELECT row_to_json(x) FROM (SELECT s.state, s.consecutive_failures, s.last_error, c.errors FROM sync.status s "
		  . "JOIN sync.stat_collections c USING (source, collection) WHERE source = 'x') x"));
	is("$st->{state},$st->{consecutive_failures}," . ($st->{errors} - $x_errors), 'syncing,0,0',
		'x: still syncing, no error recorded since the narrowing') or diag('last_error: ' . ($st->{last_error} // 'none'));
}
{
	my ($V1, $old) = split /\|/, sql("SELECT id, last_name FROM x.contact WHERE char_length(last_name) <= 5 "
		  . "AND id <> '$U1' ORDER BY id COLLATE \"C\" LIMIT 1");
	ok(defined $old, "V1 = $V1 has a LastName that fits ($old)");
	my $rec = admin($C, 'PATCH', "records/Contact/$V1", { LastName => 'Overlongname', FirstName => 'V1First' });
	ok(wait_sql(60, "SELECT given_name = 'V1First' FROM x.contact WHERE id = '$V1'"),
		'a record with a LastName too long arrives (its FirstName changed in the same update)');
	is(sql("SELECT coalesce(last_name, 'NULL') || ',' || (system_modstamp = '$rec->{SystemModstamp}'::timestamptz) "
		  . "FROM x.contact WHERE id = '$V1'"), 'NULL,true', 'its last_name is null, the rest of the row is new');
	is(sql("SELECT api_field || ',' || column_name || ',' || value || ',' || sqlstate || ',' || record_dropped || ',' || (times >= 1) "
		  . "FROM sync.rejected WHERE source = 'x' AND record_id = '$V1'"), 'LastName,last_name,Overlongname,22001,false,true',
		'sync.rejected lists (V1, LastName, Overlongname, 22001)');
	like(sql("SELECT error FROM sync.rejected WHERE source = 'x' AND record_id = '$V1'"), qr/too long/,
		'the rejection keeps the error message');
	my $st = $json->decode(sql("SELECT row_to_json(x) FROM (SELECT s.state, s.consecutive_failures, s.last_error, c.errors FROM sync.status s "
		  . "JOIN sync.stat_collections c USING (source, collection) WHERE source = 'x') x"));
	is("$st->{state},$st->{consecutive_failures}," . ($st->{errors} - $x_errors), 'syncing,0,0',
		'x: still syncing, no error recorded after the rejection') or diag('last_error: ' . ($st->{last_error} // 'none'));
	admin($C, 'PATCH', "records/Contact/$V1", { LastName => 'Fits' });
	ok(wait_sql(60, "SELECT last_name = 'Fits' FROM x.contact WHERE id = '$V1'"), 'a value that fits later is stored');
}
{
	sql('CREATE ROLE reader LOGIN');
	my ($out, $err) = ('', '');
	my $rc = $node->psql('postgres', 'SELECT count(*) FROM sync.status', stdout => \$out, stderr => \$err,
		extra_params => [ '-U', 'reader' ]);
	is("$rc,$out", '0,4', 'a plain role reads sync.status');
	for my $rel (qw(sync.rejected sync.rejected_values))
	{
		$rc = $node->psql('postgres', "SELECT count(*) FROM $rel", stdout => \$out, stderr => \$err,
			extra_params => [ '-U', 'reader' ]);
		isnt($rc, 0, "a plain role cannot read $rel");
		like($err, qr/permission denied/, "$rel: permission denied") or diag($err);
	}
}

# every column backfill notified once
{
	my $all = notifications($listener);
	my %count;
	$count{ $_->{table} . ' ' . $json->encode($_->{columns}) }++ for grep { defined $_->{columns} } @$all;
	is(join(' ', map { "$_=$count{$_}" } sort keys %count),
		'cols.contact ["Email"]=1 x.contact ["Engagement_Score__c"]=2 x.contact ["LastName"]=1 '
		  . 'x.contact ["Phone"]=1 x.contact ["Shoe_Size__c"]=1 x.contact ["Visit_Count__c"]=1',
		'one notification per column backfill');
	my %main;
	$main{ $_->{table} }++ for grep { !defined $_->{columns} } @$all;
	is(join(' ', map { "$_=$main{$_}" } sort keys %main), 'cols.contact=2 hs.contacts=1 prog.contact=1 x.contact=1',
		'one notification per backfill (cols: backfill and resync)');
}

$listener->{in} .= "\\q\n";
eval { $listener->{h}->finish; };
$listener = undef;
note('total ' . elapsed());
done_testing();
