# Crashes (issue 6): the sync worker killed with SIGKILL (the postmaster then restarts every
# backend), an immediate shutdown, and a normal (fast) restart, each while the worker is in the
# middle of
#   1. a backfill page (Salesforce: every crash kind; Airtable: SIGKILL, immediate),
#   2. an incremental page (Salesforce: the first page of a poll; the second page of a poll
#      while the first is committed; a page waiting for a table lock in the middle of its
#      apply; Airtable: a poll),
#   3. a delete step (Salesforce: getDeleted; a sweep's later page; a sweep's first page;
#      Airtable: a sweep's later page, and a sweep started by a short sweep_interval).
# "In the middle" is made deterministic with the fakes' fault injection: a request stalls for
# 60 s (delay) and the crash comes once the fake has counted the request's arrival, after the
# pages before it were committed.
# After each crash: a new worker, a live state (no error, no stale activity or waiting_on),
# the work resumed from the last committed cursor (the request log shows the same page asked
# again, the backfill query ran once), every change made in the fake before the crash arrives,
# and the tables equal the fakes' records row for row and value for value. The counters are
# exact: records_upserted counts each row written once (a re-read unchanged row is not
# rewritten), records_deleted each row removed once, backfill_records each page once, one
# backfill_completed event per collection (outbox of a webhook target that never answers).
# And lag: after a walk resumed across a crash completes, last_caught_up_at must not claim a
# change the table does not have yet (section 2b).
use strict;
use warnings;

use B ();
use Encode qw(decode_utf8 encode_utf8);
use FindBin;
use lib $FindBin::Bin;
use JSON::PP;
use POSIX qw(strftime);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;         # bytes <-> structures
my $jtext = JSON::PP->new->canonical->allow_nonref;              # psql output (characters)
my $jexact = JSON::PP->new->utf8->allow_nonref->allow_bignum;    # Airtable records: exact decimals
my $jsql_exact = JSON::PP->new->allow_nonref->allow_bignum;      # psql output, exact decimals
my $creds = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $node;

# ---------------------------------------------------------------------------
# Helpers: SQL that survives a crash, crashing, and the state after it
# ---------------------------------------------------------------------------

# The output of $q, or undef when it failed (e.g. the server is restarting).
sub try_sql
{
	my ($q) = @_;
	my ($out, $err) = ('', '');
	my $ret = eval { $node->psql('postgres', encode_utf8($q), stdout => \$out, stderr => \$err) };
	return (defined $ret && $ret == 0) ? decode_utf8($out) : undef;
}

sub log_size { return -s $node->logfile // 0; }

sub log_since { return substr(slurp_file($node->logfile), $_[0]); }

sub worker_count { return sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'sync worker'"); }

# Crash the server ($how: SIGKILL of the worker, immediate shutdown + start, or fast restart)
# and wait for the worker of its next life. Returns (new pid, time of the crash).
sub crash
{
	my ($how, $label) = @_;
	my $old = sql('SELECT sync.worker_pid()');
	my $off = log_size();
	my $t = time;
	if ($how eq 'SIGKILL')
	{
		ok(kill('KILL', $old), "$label: SIGKILL sent to the worker (pid $old)");
	}
	elsif ($how eq 'immediate')
	{
		$node->stop('immediate');
		$node->start;
	}
	else
	{
		$node->restart;
	}
	my $new;
	my $up = wait_until(120, sub {
			my $r = try_sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sync worker' "
				  . "AND pid = sync.worker_pid() AND pid <> $old");
			$new = $r if defined $r && $r =~ /^\d+$/;
			return defined $new;
		}, 0.3);
	ok($up, "$label: a new worker runs after the $how (pid " . ($new // 'none') . ", was $old)");
	ok(!kill(0, $old), "$label: the old worker process is gone");
	if ($how eq 'SIGKILL')
	{
		my $log = log_since($off);
		like($log, qr/"sync worker" \(PID $old\) was terminated by signal 9/,
			"$label: the postmaster saw the worker killed");
		like($log, qr/all server processes terminated; reinitializing/, "$label: and restarted every backend");
	}
	return ($new // 0, $t);
}

# After a crash, once the caller's data condition holds: a live state, nothing stale.
sub check_live
{
	my ($label, $source, $coll, $t, $pid, $want_state) = @_;
	my $where = 'source = ' . lit($source) . ' AND collection = ' . lit($coll);
	ok(wait_sql(60, "SELECT last_poll_at > to_timestamp($t) FROM sync.status WHERE $where"),
		"$label: a step committed after the crash");
	my $st = status_of($source, $coll);
	is($st->{state}, $want_state, "$label: state $want_state");
	is($st->{consecutive_failures}, 0, "$label: consecutive_failures 0");
	ok(!defined $st->{last_error}, "$label: no error recorded (the crash is no failure of the collection)")
	  or diag("last_error: $st->{last_error}");
	if ($want_state eq 'backfilling')
	{
		is($st->{activity}, 'backfilling', "$label: activity backfilling");
		ok(!defined $st->{waiting_on} || $st->{waiting_on} =~ /^request budget:/,
			"$label: waiting on nothing but the request budget") or diag("waiting_on: $st->{waiting_on}");
	}
	else
	{
		like($st->{activity} // 'null', qr/^(polling for changes|checking for deletes|sweeping ids for deletes)$/,
			"$label: activity is a step's, not a retry's ($st->{activity})");
		ok(!defined $st->{waiting_on}, "$label: waiting_on null") or diag("waiting_on: $st->{waiting_on}");
	}
	is(sql("SELECT penalty_until IS NULL FROM sync.budgets WHERE source = " . lit($source)), 't',
		"$label: no penalty on the source");
	is(sql('SELECT sync.worker_pid()'), $pid, "$label: the worker has not died again");
	is(worker_count(), 1, "$label: one sync worker in pg_stat_activity");
	return $st;
}

# ---------------------------------------------------------------------------
# Helpers: the fakes' faults and request logs
# ---------------------------------------------------------------------------

# A request matching $regex (path?query) stalls for 60 s, once.
sub stall
{
	my ($F, $regex) = @_;
	return admin($F, 'POST', 'faults', { path_regex => $regex, delay => 60, count => 1 })->{id};
}

sub fault_hits
{
	my ($F, $id) = @_;
	my ($f) = grep { $_->{id} == $id } @{ admin($F, 'GET', 'faults') };
	return $f ? $f->{hits} : -1;
}

sub wait_stalled
{
	my ($F, $id, $label) = @_;
	return ok(wait_until(90, sub { fault_hits($F, $id) >= 1 }), "$label: the worker is inside the stalled request");
}

# The fake's requests that arrived after $t, in arrival order.
sub requests_after
{
	my ($F, $t) = @_;
	return [ sort { $a->{t} <=> $b->{t} } grep { $_->{t} > $t } @{ admin($F, 'GET', 'requests') } ];
}

sub full_path
{
	my ($e) = @_;
	return $e->{path} . (defined $e->{query} && length $e->{query} ? "?$e->{query}" : '');
}

sub brief_entry
{
	my ($e) = @_;
	return $e ? "$e->{method} " . full_path($e) . " -> $e->{status}" : 'none';
}

sub pause_source
{
	my ($source) = @_;
	sql('SELECT sync.pause(' . lit($source) . ')');
}

sub resume_source
{
	my ($source) = @_;
	sql('SELECT sync.resume(' . lit($source) . ')');
	sql('SELECT sync.run_now(' . lit($source) . ')');
}

# ---------------------------------------------------------------------------
# Helpers: Salesforce values (as 002_salesforce.pl) and the table comparison
# ---------------------------------------------------------------------------

sub api_describe
{
	my ($fake, $object) = @_;
	my $res = http()->post_form("$fake->{url}/services/oauth2/token",
		{ grant_type => 'refresh_token', client_id => 'test-client',
		  client_secret => 'test-secret', refresh_token => 'test-refresh' });
	die "token: $res->{status} $res->{content}" unless $res->{success};
	my $tok = $json->decode($res->{content});
	$res = http()->get("$tok->{instance_url}/services/data/v66.0/sobjects/$object/describe",
		{ headers => { Authorization => "Bearer $tok->{access_token}" } });
	die "describe: $res->{status} $res->{content}" unless $res->{success};
	return $json->decode($res->{content});
}

sub sf_epoch
{
	my ($s) = @_;
	my @p = $s =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|([+-])(\d\d):?(\d\d))$/
	  or return undef;
	my $e = days_from_civil($p[0], $p[1], $p[2]) * 86400 + $p[3] * 3600 + $p[4] * 60 + $p[5];
	$e += "0.$p[6]" if defined $p[6];
	$e -= ($p[8] eq '-' ? -1 : 1) * ($p[9] * 3600 + $p[10] * 60) if $p[7] ne 'Z';
	return $e;
}

my %SF_TEXT = map { $_ => 1 }
  qw(id reference string textarea email phone url picklist combobox encryptedstring anyType);
my %SF_NUMBER = map { $_ => 1 } qw(double currency percent);

sub sf_expect
{
	my ($type, $v) = @_;
	return 'NULL' unless defined $v;
	return "s:$v" if $SF_TEXT{$type};
	return 'a:' . $json->encode([ split /;/, $v ]) if $type eq 'multipicklist';
	return 'b:' . ($v ? 'true' : 'false') if $type eq 'boolean';
	return 'n:' . sprintf('%d', $v) if $type eq 'int';
	return 'n:' . sprintf('%.15g', $v) if $SF_NUMBER{$type};
	return "d:$v" if $type eq 'date';
	if ($type eq 'datetime')
	{
		my $e = sf_epoch($v);
		return defined $e ? sprintf('e:%.3f', $e) : "bad-api-datetime:$v";
	}
	if ($type eq 'time')
	{
		my @p = $v =~ /^(\d\d):(\d\d):(\d\d)(\.\d+)?Z$/ or return "bad-api-time:$v";
		return sprintf('e:%.3f', $p[0] * 3600 + $p[1] * 60 + $p[2] + ($p[3] // 0));
	}
	return 'j:' . $json->encode(canon($v)) if $type eq 'address';
	return "unknown-type:$type";
}

sub sf_got
{
	my ($type, $g) = @_;
	return 'NULL' unless defined $g;
	return ref($g) ? 'bad:ref' : "s:$g" if $SF_TEXT{$type};
	return ref($g) eq 'ARRAY' ? 'a:' . $json->encode($g) : "bad:$g" if $type eq 'multipicklist';
	return JSON::PP::is_bool($g) ? 'b:' . ($g ? 'true' : 'false') : "bad:$g" if $type eq 'boolean';
	return $g =~ /^-?\d+$/ ? 'n:' . sprintf('%d', $g) : "bad:$g" if $type eq 'int';
	return 'n:' . sprintf('%.15g', $g) if $SF_NUMBER{$type};
	return "d:$g" if $type eq 'date';
	return sprintf('e:%.3f', $g) if $type eq 'datetime' || $type eq 'time';
	return ref($g) eq 'HASH' ? 'j:' . $json->encode(canon($g)) : "bad:$g" if $type eq 'address';
	return "unknown-type:$type";
}

sub qi
{
	my ($name) = @_;
	$name =~ s/"/""/g;
	return qq{"$name"};
}

# The table's rows as {id => {api_field => value}} (times as epoch seconds), and its row counts.
sub table_rows
{
	my ($table, $fields, $is_time, $decoder) = @_;
	my $rows = $decoder->decode(sql(
		"SELECT coalesce(json_agg(x), '[]') FROM (SELECT "
		  . join(', ',
			map {
				my $col = qi($_->{column_name});
				($is_time->($_) ? "extract(epoch FROM $col)" : $col) . ' AS ' . qi($_->{api_field})
			} @$fields)
		  . " FROM $table) x"));
	my ($n, $ndistinct) = split /\|/, sql("SELECT count(*), count(DISTINCT id) FROM $table");
	return ($rows, $n, $ndistinct);
}

# Shared by both providers: every record of the API in the table and nothing else, every value
# equal. $expect->($field, $record) and $got->($field, $value) give comparable strings.
sub compare_rows
{
	my ($label, $table, $fields, $expected, $key, $rows, $n, $ndistinct, $expect, $got) = @_;
	my %got = map { $_->{$key} => $_ } @$rows;
	my %exp = map { $_->{id} // $_->{Id} => $_ } @$expected;
	my (@missing, @extra, @diff);
	my $values = 0;
	for my $id (sort keys %exp)
	{
		my $g = $got{$id};
		if (!$g)
		{
			push @missing, $id;
			next;
		}
		for my $f (@$fields)
		{
			my $want = $expect->($f, $exp{$id});
			my $have = $got->($f, $g->{ $f->{api_field} });
			$values++;
			push @diff, "$id $f->{api_field} ($f->{api_type}): table $have, API $want" if $have ne $want;
		}
	}
	for my $id (sort keys %got)
	{
		push @extra, $id unless $exp{$id};
	}
	is($n, scalar(@$expected), "$label: " . scalar(@$expected) . ' rows');
	is($ndistinct, $n, "$label: no id twice");
	is(scalar(@missing), 0, "$label: no API record missing from the table")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
	is(scalar(@extra), 0, "$label: no row the API does not have")
	  or diag("extra: @extra[0 .. ($#extra < 9 ? $#extra : 9)]");
	is(scalar(@diff), 0, "$label: all $values values equal the API's")
	  or diag(join("\n", @diff[0 .. ($#diff < 19 ? $#diff : 19)]));
	return \%got;
}

my ($SF, @sf_fields);

sub compare_sf
{
	my ($label) = @_;
	my $truth = admin($SF, 'GET', 'records/Contact');
	my ($rows, $n, $nd) = table_rows('sf.contact', \@sf_fields,
		sub { $_[0]{type} eq 'datetime' || $_[0]{type} eq 'time' }, $jtext);
	compare_rows($label, 'sf.contact', \@sf_fields, $truth, 'Id', $rows, $n, $nd,
		sub { sf_expect($_[0]{type}, $_[1]{ $_[0]{api_field} }) }, sub { sf_got($_[0]{type}, $_[1]) });
	return $truth;
}

# ---------------------------------------------------------------------------
# Helpers: Airtable values (as 005_airtable.pl): numbers compared as exact decimals
# ---------------------------------------------------------------------------

sub at_epoch
{
	my ($s) = @_;
	my @p = "$s" =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z$/ or return undef;
	my $e = days_from_civil(@p[ 0 .. 2 ]) * 86400 + $p[3] * 3600 + $p[4] * 60 + $p[5];
	$e += "0.$p[6]" if defined $p[6];
	return $e;
}

sub dec_norm
{
	my ($s) = @_;
	my ($sign, $int, $frac, $exp) = "$s" =~ /^\s*([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?\s*$/
	  or return "not-a-number:$s";
	$frac //= '';
	my $digits = $int . $frac;
	$exp = ($exp // 0) - length($frac);
	$digits =~ s/^0+//;
	return '0' if $digits eq '';
	$exp++ while $digits =~ s/0$//;
	return ($sign eq '-' ? '-' : '') . $digits . ($exp ? "e$exp" : '');
}

sub jkind
{
	return 'null' unless defined $_[0];
	return 'bool' if JSON::PP::is_bool($_[0]);
	my $r = ref $_[0];
	return 'num' if $r eq 'Math::BigFloat' || $r eq 'Math::BigInt';
	return 'array' if $r eq 'ARRAY';
	return 'object' if $r eq 'HASH';
	return "ref-$r" if $r;
	my $flags = B::svref_2object(\$_[0])->FLAGS;
	return (($flags & (B::SVp_IOK | B::SVp_NOK)) && !($flags & B::SVp_POK)) ? 'num' : 'str';
}

sub canon_struct
{
	my ($v) = @_;
	my $k = jkind($v);
	return undef if $k eq 'null';
	return 'b:' . ($v ? 'true' : 'false') if $k eq 'bool';
	return 'n:' . dec_norm($v) if $k eq 'num';
	return "s:$v" if $k eq 'str';
	return [ map { canon_struct($_) } @$v ] if $k eq 'array';
	return { map { $_ => canon_struct($v->{$_}) } keys %$v } if $k eq 'object';
	return "?$k";
}

my %AT_TEXT = map { $_ => 1 } qw(recordId singleLineText multilineText richText email url phoneNumber singleSelect);
my %AT_NUMBER = map { $_ => 1 } qw(number currency percent rating duration count autoNumber);
my %AT_ARRAY = map { $_ => 1 } qw(multipleSelects multipleRecordLinks);
my %AT_TIME = map { $_ => 1 } qw(dateTime createdTime lastModifiedTime);

sub at_expect
{
	my ($type, $v) = @_;
	my $k = jkind($v);
	if ($type eq 'checkbox')
	{
		return 'b:false' if $k eq 'null';
		return ($k eq 'bool' && $v) ? 'b:true' : "api-checkbox-$k";
	}
	return 'NULL' if $k eq 'null';
	return $k eq 'str' ? "s:$v" : "api-$k" if $AT_TEXT{$type};
	return $k eq 'num' ? 'n:' . dec_norm($v) : "api-$k" if $AT_NUMBER{$type};
	return $k eq 'array' ? 'a:' . $json->encode([ map { "$_" } @$v ]) : "api-$k" if $AT_ARRAY{$type};
	return "d:$v" if $type eq 'date';
	if ($AT_TIME{$type})
	{
		my $e = at_epoch($v);
		return defined $e ? sprintf('e:%.3f', $e) : "bad-api-time:$v";
	}
	return 'j:' . $json->encode(canon_struct($v));
}

sub at_got
{
	my ($type, $g) = @_;
	my $k = jkind($g);
	return 'NULL' if $k eq 'null';
	return $k eq 'bool' ? 'b:' . ($g ? 'true' : 'false') : "table-$k" if $type eq 'checkbox';
	return $k eq 'str' ? "s:$g" : "table-$k" if $AT_TEXT{$type};
	return $k eq 'num' ? 'n:' . dec_norm($g) : "table-$k" if $AT_NUMBER{$type};
	return $k eq 'array' ? 'a:' . $json->encode([ map { "$_" } @$g ]) : "table-$k" if $AT_ARRAY{$type};
	return "d:$g" if $type eq 'date';
	return $k eq 'num' ? sprintf('e:%.3f', "$g") : "table-$k" if $AT_TIME{$type};
	return 'j:' . $json->encode(canon_struct($g));
}

my ($AT, $at_base, $at_tbl, $at_table, @at_fields);
my $AT_COLL = 'Companies & Partners';

sub at_truth { return admin_request($jexact, $AT, 'GET', "records/$at_base/$at_tbl"); }

sub compare_at
{
	my ($label) = @_;
	my $truth = at_truth();
	my ($rows, $n, $nd) = table_rows($at_table, \@at_fields, sub { $AT_TIME{ $_[0]{api_type} } }, $jsql_exact);
	compare_rows($label, $at_table, \@at_fields, $truth, 'id', $rows, $n, $nd,
		sub { at_expect($_[0]{api_type}, $_[0]{api_field} eq 'id' ? $_[1]{id} : $_[1]{fields}{ $_[0]{api_field} }) },
		sub { at_got($_[0]{api_type}, $_[1]) });
	return $truth;
}

# The decoded parameters of an Airtable list request.
sub at_params
{
	my ($e) = @_;
	my %p;
	for my $pair (split /&/, $e->{query} // '')
	{
		my ($k, $v) = split /=/, $pair, 2;
		$p{ decode_utf8(urldecode($k)) } = decode_utf8(urldecode($v // ''));
	}
	return \%p;
}

sub at_list_requests
{
	my ($log) = @_;
	return grep { $_->{method} eq 'GET' && $_->{path} =~ m{^/v0/app\w+/[^/]+$} } @$log;
}

sub counters
{
	my ($source, $coll) = @_;
	my $st = status_of($source, $coll);
	return "$st->{records_upserted}/$st->{records_deleted}";
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

is(sf_epoch('2024-05-01T12:34:56.789+0000'), 1714566896.789, 'datetime helper: a known instant');
is(dec_norm('412.180'), dec_norm('412.18'), 'decimal helper: trailing zeros do not matter');

$SF = start_fake('salesforce', 'crash', '--records', 1500, '--seed', 11);
$AT = start_fake('airtable', 'crash', '--rate-limit', 0, '--token-rate-limit', 0, '--tables', 2,
	'--records', 1000, '--seed', 5);
# The fake org runs 10 minutes behind: getDeleted windows (whole minutes, never past the fake's
# current minute) can then be moved on by advancing its clock instead of waiting for a minute.
admin($SF, 'POST', 'clock', { offset => -600 });

$node = start_node(max_backoff => 2, initdb_extra => [ '--encoding=UTF8', '--locale=C' ], utf8 => 1);
# Cluster.pm turns restart_after_crash off; a crashed worker must bring the others down and
# back up as in production. A page waiting for a table lock waits long enough to be crashed.
$node->append_conf('postgresql.conf', "restart_after_crash = on\nsync.lock_timeout = 120000\n");
$node->restart;

# A webhook target that never answers: its outbox rows show each event that was emitted.
sql("SELECT sync.add_notification('probe', 'webhook', 'http://127.0.0.1:9/never', '{}', '{backfill_completed}')");

my $describe = api_describe($SF, 'Contact');
my %sf_type = map { $_->{name} => $_->{type} } @{ $describe->{fields} };

# ---------------------------------------------------------------------------
# 1. Salesforce: crashes in the middle of backfill pages (SIGKILL, immediate, restart)
# ---------------------------------------------------------------------------

my $N = 1500;
admin($SF, 'DELETE', 'requests');
my %bf_fault = map { $_ => stall($SF, "/query/\\w+-$_\$") } (400, 800, 1200);
sql("SELECT sync.create_source('sf', 'salesforce', '$SF->{url}', '$creds', "
	  . "'{\"requests_per_second\": 50, \"batch_size\": 200, \"poll_interval\": 1, \"deleted_interval\": 2}')");
is(sql("SELECT sync.add_collection('sf', 'Contact')"), 'sf.contact', 'add_collection creates sf.contact');
{
	my $cols = $jtext->decode(sql(
		"SELECT json_agg(json_build_object('api_field', api_field, 'api_type', api_type, 'column_name', column_name) "
		  . "ORDER BY position) FROM sync.columns WHERE source = 'sf' AND collection = 'Contact'"));
	@sf_fields = map { { %$_, type => $sf_type{ $_->{api_field} } // 'missing-from-describe' } } @$cols;
	cmp_ok(scalar(@sf_fields), '>=', 20, 'sf.contact has a column per field (' . scalar(@sf_fields) . ')');
}

my @last_crash;
for my $case ([ 400, 'SIGKILL' ], [ 800, 'immediate' ], [ 1200, 'restart' ])
{
	my ($at, $how) = @$case;
	my $label = "sf backfill, $how at record $at";
	wait_stalled($SF, $bf_fault{$at}, $label);
	my $st = status_of('sf', 'Contact');
	is($st->{backfill_records}, $at, "$label: the pages before were committed ($at records)");
	is(sql("SELECT count(*) FROM sf.contact"), $at, "$label: the table holds those $at rows");
	my $next = cursor_of('sf', 'Contact')->{next_url} // '';
	like($next, qr{/query/\w+-$at$}, "$label: the committed cursor points at the stalled page");
	my ($pid, $t) = crash($how, $label);
	ok(wait_sql(60, "SELECT backfill_records > $at OR phase = 'incremental' FROM sync.status WHERE source = 'sf'"),
		"$label: the backfill goes on");
	my @data = grep { $_->{path} =~ m{/query} } @{ requests_after($SF, $t) };
	is($data[0] ? $data[0]{path} : 'none', $next, "$label: the first page asked after the crash is the stalled one")
	  or diag(join("\n", map { brief_entry($_) } @data[ 0 .. ($#data < 4 ? $#data : 4) ]));
	# the next stall holds the backfill in progress; after the last one it completes
	check_live($label, 'sf', 'Contact', $t, $pid, 'backfilling') if $at != 1200;
	@last_crash = ($label, $pid, $t);
	note("$label done at " . elapsed());
}
is(sql("SELECT sync.wait_for_backfill('sf', 'Contact', '120s')"), 't', 'sf: the backfill completes');
check_live($last_crash[0], 'sf', 'Contact', $last_crash[2], $last_crash[1], 'syncing');
{
	my $st = status_of('sf', 'Contact');
	is($st->{backfill_records}, $N, "sf: backfill_records = $N (no page counted twice, none skipped)");
	is($st->{backfill_total}, $N, "sf: backfill_total = $N");
	is($st->{records_upserted}, $N, "sf: records_upserted = $N (each row written once)");
	is($st->{records_deleted}, 0, 'sf: records_deleted = 0');
	my $log = admin($SF, 'GET', 'requests');
	my @starts = grep { $_->{path} =~ m{/query/?$} && (soql_of($_) // '') =~ /^SELECT .* FROM Contact ORDER BY/ } @$log;
	is(scalar(@starts), 1, 'sf: the backfill query ran once: every crash resumed from the cursor (locator)')
	  or diag(join("\n", map { brief_entry($_) } @starts));
	my %ok;
	for my $e (@$log)
	{
		$ok{$1}++ if $e->{path} =~ m{/query/\w+-(\d+)$} && $e->{status} == 200;
	}
	is(join(',', sort { $a <=> $b } keys %ok), join(',', map { $_ * 200 } 1 .. 7), 'sf: every page 200..1400 fetched');
	my @twice = grep { $ok{$_} > 1 && !$bf_fault{$_} } keys %ok;
	is(scalar(@twice), 0, 'sf: no page but the stalled ones asked twice') or diag("asked twice: @twice");
}
ok(wait_sql(60, "SELECT state = 'syncing' AND consecutive_failures = 0 AND last_error IS NULL FROM sync.status WHERE source = 'sf'"),
	'sf: syncing after the backfill, no error');
my $sf_truth = compare_sf('sf.contact after three crashes mid-backfill');
my @sf_ids = sort map { $_->{Id} } @$sf_truth;
my ($want_up, $want_del) = ($N, 0);
note('section 1 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 2. Salesforce: crashes in the middle of incremental pages
# ---------------------------------------------------------------------------

my %c = map { $_->{api_field} => $_->{column_name} } @sf_fields;
sub sf_in_table { return sql("SELECT count(*) FROM sf.contact WHERE id IN (" . join(', ', map { lit($_) } @_) . ')'); }

# 2a. SIGKILL while the first page of a poll (queryAll) is in flight; the changes are in it.
{
	my $label = 'sf poll, SIGKILL on its first page';
	pause_source('sf');
	my $f = stall($SF, '/queryAll/?\?q=');
	my @new = map { admin($SF, 'POST', 'records/Contact', { LastName => "Crash2a-$_", FirstName => "N\x{e9}$_",
				Email => "c2a$_\@example.com", Visit_Count__c => 40 + $_, Lifetime_Value__c => 12.5 * $_ })->{Id} } 1 .. 3;
	my @upd = @sf_ids[ 10 .. 14 ];
	admin($SF, 'PATCH', "records/Contact/$_", { Title => "Updated 2a $_", Description => "line1\nline2 '$_'",
			DoNotCall => JSON::PP::true, Birthdate => '1999-12-31' }) for @upd;
	my @soft = @sf_ids[ 20, 21 ];
	admin($SF, 'DELETE', "records/Contact/$_") for @soft;
	resume_source('sf');
	wait_stalled($SF, $f, $label);
	is(sf_in_table(@new), 0, "$label: the new records are not in the table yet");
	my ($pid, $t) = crash('SIGKILL', $label);
	ok(wait_sql(60, "SELECT (SELECT count(*) FROM sf.contact WHERE id IN (" . join(', ', map { lit($_) } @new) . ")) = 3 "
		  . "AND (SELECT count(*) FROM sf.contact WHERE $c{Title} LIKE 'Updated 2a %') = 5 "
		  . "AND NOT EXISTS (SELECT 1 FROM sf.contact WHERE id IN (" . join(', ', map { lit($_) } @soft) . '))'),
		"$label: 3 creates, 5 updates and 2 soft deletes arrive after the crash");
	check_live($label, 'sf', 'Contact', $t, $pid, 'syncing');
	my @polls = grep { $_->{path} =~ m{/queryAll/?$} } @{ requests_after($SF, $t) };
	ok(@polls && $polls[0]{status} == 200, "$label: the poll ran again after the crash") or diag(brief_entry($polls[0]));
	$want_up += 3 + 5;
	$want_del += 2;
	is(counters('sf', 'Contact'), "$want_up/$want_del", "$label: records_upserted/records_deleted exact ($want_up/$want_del)");
	note("$label done at " . elapsed());
}

# 2b. Immediate shutdown while page 2 of a poll is in flight and page 1 is committed.
{
	my $label = 'sf poll, immediate shutdown on its second page';
	pause_source('sf');
	my $f = stall($SF, '/query/\w+-200$');
	my @bulk = @sf_ids[ 100 .. 599 ];
	my $b = admin($SF, 'POST', 'bulk_update/Contact', { ids => \@bulk, fields => { Title => 'Bulk 2b', Visit_Count__c => 2222 } });
	is(scalar(@{ $b->{ids} }), 500, "$label: 500 records updated in the fake with one SystemModstamp");
	resume_source('sf');
	wait_stalled($SF, $f, $label);
	my $next = cursor_of('sf', 'Contact')->{next_url} // '';
	like($next, qr{/query/\w+-200$}, "$label: the committed cursor points at page 2");
	my $done = sql("SELECT count(*) FROM sf.contact WHERE $c{Title} = 'Bulk 2b'");
	ok($done > 0 && $done < 500, "$label: page 1 was committed ($done of the 500 rows), not the rest");
	# A change the interrupted walk cannot contain (the locator's ids were fixed when its query
	# ran): only the next walk brings it. That walk's first page is held up for 8 s, so that the
	# status can be read between the two walks.
	my $R = $sf_ids[700];
	my $t_r = time;
	admin($SF, 'PATCH', "records/Contact/$R", { Title => 'Changed during the 2b stall' });
	my $f2 = admin($SF, 'POST', 'faults', { path_regex => '/queryAll/?\?q=', delay => 8, count => 1 })->{id};
	my ($pid, $t) = crash('immediate', $label);
	ok(wait_sql(60, "SELECT count(*) = 500 FROM sf.contact WHERE $c{Title} = 'Bulk 2b' AND $c{Visit_Count__c} = 2222"),
		"$label: all 500 rows arrive after the crash");
	wait_stalled($SF, $f2, "$label: the walk after the resumed one");
	{
		# lag = now() - last_caught_up_at promises every change made before last_caught_up_at
		# is in the table. The resumed walk began before the crash (its query ran then).
		my $r = row("SELECT extract(epoch FROM last_caught_up_at) AS caught_up, "
			  . "(SELECT $c{Title} FROM sf.contact WHERE id = " . lit($R) . ") AS title "
			  . "FROM sync.status WHERE source = 'sf'");
		my $has = ($r->{title} // '') eq 'Changed during the 2b stall';
		ok($has || ($r->{caught_up} // 0) <= $t_r,
			"$label: last_caught_up_at does not claim a change the table lacks (BUG if not: the walk resumed "
			  . 'after a crash counts as started after the crash)')
		  or diag(sprintf('last_caught_up_at = change + %.1f s; the change (made %.1f s before the crash) is not in the table',
				$r->{caught_up} - $t_r, $t - $t_r));
	}
	ok(wait_sql(60, "SELECT $c{Title} = 'Changed during the 2b stall' FROM sf.contact WHERE id = " . lit($R)),
		"$label: the next walk brings the change");
	check_live($label, 'sf', 'Contact', $t, $pid, 'syncing');
	my @data = grep { $_->{path} =~ m{/query} } @{ requests_after($SF, $t) };
	is($data[0] ? $data[0]{path} : 'none', $next, "$label: the poll went on with page 2 of its locator")
	  or diag(join("\n", map { brief_entry($_) } @data[ 0 .. ($#data < 4 ? $#data : 4) ]));
	$want_up += 501;
	is(counters('sf', 'Contact'), "$want_up/$want_del", "$label: counters exact ($want_up/$want_del): page 1 not counted twice");
	note("$label done at " . elapsed());
}

# 2c. Restart while a page of changes waits for a table lock in the middle of its apply: the
#     poll's request stalls (6 s), a user locks the table meanwhile, the page arrives and its
#     apply waits for the lock (sync.lock_timeout is 120 s here).
{
	my $label = 'sf poll, restart in the middle of an apply';
	pause_source('sf');
	my @upd = @sf_ids[ 30 .. 33 ];
	admin($SF, 'PATCH', "records/Contact/$_", { Title => "Updated 2c $_", Visit_Count__c => 2323 }) for @upd;
	my $new = admin($SF, 'POST', 'records/Contact', { LastName => 'Crash2c', Email => 'c2c@example.com' })->{Id};
	my $bg = $node->background_psql('postgres');    # connected before: the lock must come in time
	my $f = admin($SF, 'POST', 'faults', { path_regex => '/queryAll/?\?q=', delay => 6, count => 1 })->{id};
	resume_source('sf');
	wait_stalled($SF, $f, $label);
	$bg->query_safe('BEGIN; LOCK TABLE sf.contact IN SHARE MODE;');
	ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'sync worker' "
			  . "AND wait_event_type = 'Lock' AND query = 'sync: applying a page')"),
		"$label: the worker waits for the lock while applying the page")
	  or diag(sql("SELECT string_agg(concat_ws(' ', pid, state, wait_event_type, wait_event, query), E'\n') "
			  . "FROM pg_stat_activity WHERE backend_type = 'sync worker'"));
	is(sf_in_table($new), 0, "$label: nothing of the page is visible");
	my ($pid, $t) = crash('restart', $label);
	eval { $bg->quit; };
	ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM sf.contact WHERE id = " . lit($new) . ") "
		  . "AND (SELECT count(*) FROM sf.contact WHERE $c{Title} LIKE 'Updated 2c %' AND $c{Visit_Count__c} = 2323) = 4"),
		"$label: the page is fetched and applied again after the restart");
	check_live($label, 'sf', 'Contact', $t, $pid, 'syncing');
	my @polls = grep { $_->{path} =~ m{/queryAll/?$} } @{ requests_after($SF, $t) };
	ok(@polls && $polls[0]{status} == 200, "$label: the poll was asked again after the restart") or diag(brief_entry($polls[0]));
	$want_up += 5;
	is(counters('sf', 'Contact'), "$want_up/$want_del", "$label: counters exact ($want_up/$want_del)");
	note("$label done at " . elapsed());
}
compare_sf('sf.contact after three crashes mid-poll');
note('section 2 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 3. Salesforce: crashes in the middle of delete steps
# ---------------------------------------------------------------------------

# 3a. SIGKILL while getDeleted is in flight; the hard deletes are only in the delete log.
{
	my $label = 'sf getDeleted, SIGKILL';
	pause_source('sf');
	my $f = stall($SF, '/sobjects/Contact/deleted/?\?');
	my @hard = @sf_ids[ 40 .. 42 ];
	admin($SF, 'DELETE', "records/Contact/$_?hard=1") for @hard;
	admin($SF, 'POST', 'clock', { offset => -530 });    # the minute of the deletes is over
	resume_source('sf');
	wait_stalled($SF, $f, $label);
	my $until = cursor_of('sf', 'Contact')->{deleted_until};
	is(sf_in_table(@hard), 3, "$label: the hard-deleted rows are still there");
	my ($pid, $t) = crash('SIGKILL', $label);
	ok(wait_sql(60, "SELECT NOT EXISTS (SELECT 1 FROM sf.contact WHERE id IN (" . join(', ', map { lit($_) } @hard) . '))'),
		"$label: the 3 hard deletes arrive after the crash");
	check_live($label, 'sf', 'Contact', $t, $pid, 'syncing');
	my ($gd) = grep { $_->{path} =~ m{/sobjects/Contact/deleted/?$} } @{ requests_after($SF, $t) };
	is($gd ? qparams($gd)->{start} : 'none', strftime('%Y-%m-%dT%H:%M:%S+00:00', gmtime(int($until))),
		"$label: getDeleted asked again from the committed deleted_until");
	$want_del += 3;
	is(counters('sf', 'Contact'), "$want_up/$want_del", "$label: counters exact ($want_up/$want_del)");
	note("$label done at " . elapsed());
}

# From now on getDeleted stays away: only a delete sweep can find hard deletes.
sql(q{SELECT sync.alter_source('sf', options => '{"deleted_interval": 3600}')});

# 3b. Immediate shutdown while page 4 of a delete sweep (sync.reconcile) is in flight.
my @sweep_deleted;
{
	my $label = 'sf sweep, immediate shutdown on a later page';
	pause_source('sf');
	my $f = stall($SF, '/query/\w+-600$');
	my @hard = @sf_ids[ 50, 51 ];
	admin($SF, 'DELETE', "records/Contact/$_?hard=1") for @hard;
	push @sweep_deleted, @hard;
	admin($SF, 'PATCH', "records/Contact/$sf_ids[60]", { Title => 'Updated 3b' });
	my $new = admin($SF, 'POST', 'records/Contact', { LastName => 'Crash3b' })->{Id};
	sql("SELECT sync.reconcile('sf', 'Contact')");
	resume_source('sf');
	wait_stalled($SF, $f, $label);
	my $cur = cursor_of('sf', 'Contact');
	like($cur->{sweep}{next_url} // '', qr{/query/\w+-600$}, "$label: the sweep's committed cursor points at the stalled page");
	is(sql("SELECT count(*) FROM sync.sweep_ids"), 600, "$label: the ids of the 3 pages before are committed");
	ok(wait_sql(30, "SELECT EXISTS (SELECT 1 FROM sf.contact WHERE id = " . lit($new) . ")"),
		"$label: polls went on between the sweep's pages");
	is(sf_in_table(@hard), 2, "$label: the hard-deleted rows are still there");
	my ($pid, $t) = crash('immediate', $label);
	ok(wait_sql(90, "SELECT sweep_started_at IS NULL AND last_sweep_at > to_timestamp($t) FROM sync.status WHERE source = 'sf'"),
		"$label: the sweep completes after the crash");
	is(sf_in_table(@hard), 0, "$label: the sweep deleted the 2 hard-deleted rows");
	is(sql("SELECT count(*) FROM sync.sweep_ids"), 0, "$label: no sweep ids left over");
	check_live($label, 'sf', 'Contact', $t, $pid, 'syncing');
	my $log = requests_after($SF, $t);
	my @more = grep { $_->{path} =~ m{/query/\w+-\d+$} } @$log;
	is($more[0] ? $more[0]{path} : 'none', $cur->{sweep}{next_url}, "$label: the sweep went on from its stalled page");
	is(scalar(grep { (soql_of($_) // '') =~ /^SELECT Id FROM Contact/ } @$log), 0, "$label: the sweep did not start over");
	$want_up += 2;
	$want_del += 2;
	is(counters('sf', 'Contact'), "$want_up/$want_del", "$label: counters exact ($want_up/$want_del)");
	note("$label done at " . elapsed());
}

# 3c. Restart while the first page of a sweep is in flight (nothing of the sweep committed).
{
	my $label = 'sf sweep, restart on its first page';
	pause_source('sf');
	my $f = stall($SF, 'q=SELECT(%20|\+)Id(%20|\+)FROM(%20|\+)Contact(%20|\+)ORDER');
	my $hard = $sf_ids[70];
	admin($SF, 'DELETE', "records/Contact/$hard?hard=1");
	push @sweep_deleted, $hard;
	my $new = admin($SF, 'POST', 'records/Contact', { LastName => 'Crash3c', Lifetime_Value__c => 3.25 })->{Id};
	sql("SELECT sync.reconcile('sf', 'Contact')");
	my $t_req = time;
	resume_source('sf');
	wait_stalled($SF, $f, $label);
	my $st = status_of('sf', 'Contact');
	ok(!defined $st->{sweep_started_at}, "$label: no sweep committed yet");
	my ($pid, $t) = crash('restart', $label);
	ok(wait_sql(90, "SELECT sweep_started_at IS NULL AND last_sweep_at > to_timestamp($t) FROM sync.status WHERE source = 'sf'"),
		"$label: the requested sweep runs and completes after the restart");
	is(sf_in_table($hard), 0, "$label: the sweep deleted the hard-deleted row");
	ok(wait_sql(30, "SELECT EXISTS (SELECT 1 FROM sf.contact WHERE id = " . lit($new) . ")"), "$label: the new record arrives");
	check_live($label, 'sf', 'Contact', $t, $pid, 'syncing');
	$want_up += 1;
	$want_del += 1;
	is(counters('sf', 'Contact'), "$want_up/$want_del", "$label: counters exact ($want_up/$want_del)");
	note("$label done at " . elapsed());
}
compare_sf('sf.contact after crashes mid-getDeleted and mid-sweep');
note('section 3 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 4. Airtable: backfill, poll and delete sweeps
# ---------------------------------------------------------------------------

{
	my $a = admin($AT, 'GET', '');
	$at_base = $a->{bases}[0];
	my ($t) = grep { $_->{name} eq $AT_COLL } @{ admin($AT, 'GET', "schema/$at_base")->{tables} };
	$at_tbl = $t->{id};
	sql("SELECT sync.create_source('at', 'airtable', '$AT->{url}', '{\"access_token\": \"$a->{pat}\"}', "
		  . "'{\"base_id\": \"$at_base\", \"requests_per_second\": 20, \"poll_interval\": 1, \"sweep_interval\": 3600}')");
}
my $at_n = 1000;
my $at_recs = at_truth();
is(scalar(@$at_recs), $at_n, "fake Airtable holds $at_n records in $AT_COLL");
admin($AT, 'DELETE', 'requests');
# The backfill's pages 4 and 8: their offsets name the last record of the page before.
my %at_fault = map { $_ => stall($AT, "returnFieldsByFieldId=true&offset=[^&]*$at_recs->[$_ - 1]{id}\$") } (300, 700);
$at_table = sql("SELECT sync.add_collection('at', " . lit($AT_COLL) . ')');
is($at_table, 'at.companies_partners', 'add_collection creates at.companies_partners');
@at_fields = @{ $jtext->decode(sql(
	"SELECT json_agg(json_build_object('api_field', api_field, 'api_type', api_type, 'column_name', column_name) "
	  . "ORDER BY position) FROM sync.columns WHERE source = 'at'")) };

for my $case ([ 300, 'SIGKILL' ], [ 700, 'immediate' ])
{
	my ($at, $how) = @$case;
	my $label = "at backfill, $how at record $at";
	wait_stalled($AT, $at_fault{$at}, $label);
	is(status_of('at', $AT_COLL)->{backfill_records}, $at, "$label: the pages before were committed ($at records)");
	my $offset = cursor_of('at', $AT_COLL)->{offset} // '';
	like($offset, qr{/\Q$at_recs->[$at - 1]{id}\E$}, "$label: the committed cursor holds the stalled page's offset");
	my ($pid, $t) = crash($how, $label);
	ok(wait_sql(60, "SELECT backfill_records > $at FROM sync.status WHERE source = 'at'"), "$label: the backfill goes on");
	my ($first) = at_list_requests(requests_after($AT, $t));
	is($first ? at_params($first)->{offset} // 'no offset' : 'none', $offset,
		"$label: the first page asked after the crash is the stalled one");
	check_live($label, 'at', $AT_COLL, $t, $pid, 'backfilling') if $at == 300;
	@last_crash = ($label, $pid, $t);
	note("$label done at " . elapsed());
}
is(sql("SELECT sync.wait_for_backfill('at', " . lit($AT_COLL) . ", '120s')"), 't', 'at: the backfill completes');
check_live($last_crash[0], 'at', $AT_COLL, $last_crash[2], $last_crash[1], 'syncing');
{
	my $st = status_of('at', $AT_COLL);
	is($st->{backfill_records}, $at_n, "at: backfill_records = $at_n");
	is($st->{records_upserted}, $at_n, "at: records_upserted = $at_n");
	my @lists = at_list_requests(admin($AT, 'GET', 'requests'));
	my @starts = grep { my $p = at_params($_); !exists $p->{offset} && !exists $p->{filterByFormula} && !exists $p->{'fields[]'} } @lists;
	is(scalar(@starts), 1, 'at: the backfill walk started once: every crash resumed from the offset');
}
compare_at('at table after two crashes mid-backfill');
my ($at_up, $at_del) = ($at_n, 0);
my @at_ids = map { $_->{id} } @$at_recs;
my %af = map { $_->{name} => $_->{id} } @{ (grep { $_->{id} eq $at_tbl } @{ admin($AT, 'GET', "schema/$at_base")->{tables} })[0]{fields} };
sub at_in_table { return sql("SELECT count(*) FROM $at_table WHERE id IN (" . join(', ', map { lit($_) } @_) . ')'); }

# 4c. Restart while a poll (filterByFormula) is in flight, with creates and updates in it.
{
	my $label = 'at poll, restart';
	pause_source('at');
	my $f = stall($AT, 'filterByFormula=');
	my @new = map { admin($AT, 'POST', "records/$at_base/$at_tbl", { fields => { Name => "Crash 4c $_ \x{2603}", Employees => 400 + $_ } })->{id} } 1 .. 2;
	my @upd = @at_ids[ 10 .. 12 ];
	admin($AT, 'PATCH', "records/$at_base/$at_tbl/$_", { fields => { Employees => 4242, Website => 'https://crash.example/4c' } }) for @upd;
	resume_source('at');
	wait_stalled($AT, $f, $label);
	my $safe_from = cursor_of('at', $AT_COLL)->{safe_from};
	is(at_in_table(@new), 0, "$label: the new records are not in the table yet");
	my ($pid, $t) = crash('restart', $label);
	ok(wait_sql(60, "SELECT (SELECT count(*) FROM $at_table WHERE id IN (" . join(', ', map { lit($_) } @new) . ")) = 2 "
		  . "AND (SELECT count(*) FROM $at_table WHERE id IN (" . join(', ', map { lit($_) } @upd) . ") AND "
		  . qi((grep { $_->{api_field} eq $af{Employees} } @at_fields)[0]{column_name}) . " = 4242) = 3"),
		"$label: 2 creates and 3 updates arrive after the restart");
	check_live($label, 'at', $AT_COLL, $t, $pid, 'syncing');
	my ($poll) = grep { exists at_params($_)->{filterByFormula} } at_list_requests(requests_after($AT, $t));
	like($poll ? at_params($poll)->{filterByFormula} : 'none',
		qr/\Q@{[ strftime('%Y-%m-%dT%H:%M:%S', gmtime(int($safe_from))) ]}\E/,
		"$label: the poll asked again from the committed safe_from");
	$at_up += 5;
	is(counters('at', $AT_COLL), "$at_up/$at_del", "$label: counters exact ($at_up/$at_del)");
	note("$label done at " . elapsed());
}

# 4d. SIGKILL while page 3 of a delete sweep (sync.reconcile) is in flight.
{
	my $label = 'at sweep, SIGKILL on a later page';
	pause_source('at');
	my @gone = @at_ids[ 500 .. 502 ];
	admin($AT, 'DELETE', "records/$at_base/$at_tbl/$_") for @gone;
	my $now = at_truth();
	my $f = stall($AT, "fields%5B%5D=[^&]*&offset=[^&]*$now->[199]{id}\$");
	sql("SELECT sync.reconcile('at', " . lit($AT_COLL) . ')');
	resume_source('at');
	wait_stalled($AT, $f, $label);
	my $cur = cursor_of('at', $AT_COLL);
	like($cur->{sweep}{offset} // '', qr{/\Q$now->[199]{id}\E$}, "$label: the sweep's committed cursor holds the stalled page's offset");
	is(sql("SELECT count(*) FROM sync.sweep_ids"), 200, "$label: the ids of the 2 pages before are committed");
	is(at_in_table(@gone), 3, "$label: the deleted records' rows are still there");
	my ($pid, $t) = crash('SIGKILL', $label);
	ok(wait_sql(90, "SELECT sweep_started_at IS NULL AND last_sweep_at > to_timestamp($t) FROM sync.status WHERE source = 'at'"),
		"$label: the sweep completes after the crash");
	is(at_in_table(@gone), 0, "$label: the sweep deleted the 3 rows");
	is(sql("SELECT count(*) FROM sync.sweep_ids"), 0, "$label: no sweep ids left over");
	check_live($label, 'at', $AT_COLL, $t, $pid, 'syncing');
	my @sweeps = grep { exists at_params($_)->{'fields[]'} } at_list_requests(requests_after($AT, $t));
	is($sweeps[0] ? at_params($sweeps[0])->{offset} // 'no offset' : 'none', $cur->{sweep}{offset},
		"$label: the sweep went on from its stalled page, not from the start");
	$at_del += 3;
	is(counters('at', $AT_COLL), "$at_up/$at_del", "$label: counters exact ($at_up/$at_del)");
	note("$label done at " . elapsed());
}

# 4e. Restart while the first page of a sweep due to a short sweep_interval is in flight.
{
	my $label = 'at sweep (sweep_interval 2), restart on its first page';
	pause_source('at');
	my @gone = @at_ids[ 600, 601 ];
	admin($AT, 'DELETE', "records/$at_base/$at_tbl/$_") for @gone;
	my $new = admin($AT, 'POST', "records/$at_base/$at_tbl", { fields => { Name => 'Crash 4e', Founded => '2001-02-03' } })->{id};
	my $f = stall($AT, 'fields%5B%5D=[^&]*$');
	sql(q{SELECT sync.alter_source('at', options => '{"sweep_interval": 2}')});
	resume_source('at');
	wait_stalled($AT, $f, $label);
	ok(!defined status_of('at', $AT_COLL)->{sweep_started_at}, "$label: no sweep committed yet");
	my ($pid, $t) = crash('restart', $label);
	ok(wait_sql(90, "SELECT last_sweep_at > to_timestamp($t) FROM sync.status WHERE source = 'at'"),
		"$label: a sweep completes after the restart");
	is(at_in_table(@gone), 0, "$label: the sweep deleted the 2 rows");
	ok(wait_sql(30, "SELECT EXISTS (SELECT 1 FROM $at_table WHERE id = " . lit($new) . ")"), "$label: the new record arrives");
	check_live($label, 'at', $AT_COLL, $t, $pid, 'syncing');
	$at_up += 1;
	$at_del += 2;
	is(counters('at', $AT_COLL), "$at_up/$at_del", "$label: counters exact ($at_up/$at_del)");
	sql(q{SELECT sync.alter_source('at', options => '{"sweep_interval": 3600}')});
	note("$label done at " . elapsed());
}
note('section 4 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 5. The end: both tables equal their API, the counters add up, nothing is left running
# ---------------------------------------------------------------------------

admin($_, 'DELETE', 'faults') for ($SF, $AT);
# Let any step of the last moments finish: both collections caught up after now.
my $t_end = time;
ok(wait_sql(60, "SELECT bool_and(last_caught_up_at > to_timestamp($t_end) AND sweep_started_at IS NULL) "
	  . "FROM sync.status WHERE source IN ('sf', 'at')"),
	'both collections caught up after the last change');
compare_sf('sf.contact at the end');
compare_at('at table at the end');
is(counters('sf', 'Contact'), "$want_up/$want_del", "sf: records_upserted/records_deleted at the end ($want_up/$want_del)");
is(counters('at', $AT_COLL), "$at_up/$at_del", "at: records_upserted/records_deleted at the end ($at_up/$at_del)");
is(sql("SELECT string_agg(source || ':' || records_upserted || '/' || records_deleted, ',' ORDER BY source) FROM sync.stat_collections"),
	"at:$at_up/$at_del,sf:$want_up/$want_del", 'sync.stat_collections agrees');
is(sql("SELECT string_agg(source || ':' || errors || '/' || rate_limited, ',' ORDER BY source) FROM sync.stat_collections"),
	'at:0/0,sf:0/0', 'sync.stat_collections: no request failed or was rate limited (a crash is neither)');
for my $pair ([ 'sf', $SF ], [ 'at', $AT ])
{
	my ($source, $F) = @$pair;
	my $made = scalar(@{ admin($F, 'GET', 'requests') });
	my $counted = sql("SELECT requests FROM sync.stat_collections WHERE source = '$source'");
	ok($counted > 0 && $counted <= $made,
		"$source: requests counted ($counted) within what the fake saw since its log was cleared ($made)");
}
is(sql("SELECT count(*) FROM sync.status WHERE state <> 'syncing' OR consecutive_failures > 0 OR sweep_started_at IS NOT NULL"),
	0, 'every collection syncing, no sweep left marked as running');
is(sql("SELECT string_agg(payload->>'source', ',' ORDER BY payload->>'source') FROM sync.notifications "
	  . "WHERE event = 'backfill_completed'"), 'at,sf',
	'one backfill_completed event per collection: no crash made a backfill complete twice');
is(worker_count(), 1, 'one sync worker at the end');
is(sql("SELECT count(*) FROM sync.sweep_ids"), 0, 'no sweep ids left');

note('total ' . elapsed());
$node->stop;
done_testing();
