# Airtable sync against the fake base in test/fake_airtable.py:
#   1. the backfill copies every record of every table exactly (value by value, every column),
#      including the table with quotes and an emoji in its name, over OAuth with single-use
#      refresh tokens;
#   2. creates, updates, emptied fields (omitted → null), deletes found by the delete sweep and
#      a 250-record bulk update sharing one second (several pages of the LAST_MODIFIED_TIME
#      filter) all reach the table;
#   3. offsets (iterators) expiring mid-backfill restart the walk: every record once, exact;
#   4. an expired access token is refreshed with the current (rotated, saved) refresh token and
#      no refresh token is ever used twice;
#   5. errors (429 RATE_LIMIT_REACHED, unknown table, wrong base id) are reported, and the worker
#      recovers and keeps going.
# Expected values come from the fake's own records (GET /__admin/records), converted in Perl;
# numbers are compared as exact decimals. A number the API sends with more than 15 significant
# digits (e.g. 0.30000000000000004, most formula quotients) that arrives rounded to 15 is not
# counted in the per-table comparisons but in one assertion at the end.
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
use Time::HiRes qw(time);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;         # bytes <-> structures
my $jexact = JSON::PP->new->utf8->allow_nonref->allow_bignum;    # API records: decimals kept exact
my $jsql = JSON::PP->new->allow_nonref->allow_bignum;            # psql output (already decoded text)
my $jtext = JSON::PP->new->allow_nonref;
my $oauth_creds = '{"client_id": "test-client", "refresh_token": "test-refresh"}';
my $node;    # set up below, sql() in utf8 mode; start_fake, admin, sql, status_of etc. are in SyncTest.pm

# ---------------------------------------------------------------------------
# Helpers: the fake's admin API and request log
# ---------------------------------------------------------------------------

# Records (and anything else compared value by value): decimals decoded exactly.
sub admin_exact { return admin_request($jexact, @_); }

# urldecode(), then UTF-8 decoded.
sub urldecode_utf8 { return decode_utf8(urldecode($_[0])); }

# (table, {param => value}) of a logged list-records request, or ().
sub list_req
{
	my ($e) = @_;
	return () unless $e->{method} eq 'GET' && $e->{path} =~ m{^/v0/app\w+/([^/]+)$};
	my $table = urldecode_utf8($1);
	my %p;
	for my $pair (split /&/, $e->{query} // '')
	{
		my ($k, $v) = split /=/, $pair, 2;
		$p{ urldecode_utf8($k) } = urldecode_utf8($v // '');
	}
	return ($table, \%p);
}

# The logged list requests of one table, each with its parsed parameters.
sub list_requests
{
	my ($log, $table) = @_;
	my @out;
	for my $e (@$log)
	{
		my ($t, $p) = list_req($e);
		push @out, { %$e, params => $p } if defined $t && $t eq $table;
	}
	return @out;
}

sub is_token_request { return $_[0]->{path} eq '/oauth2/v1/token'; }

sub brief_entry
{
	my ($e) = @_;
	return "$e->{method} $e->{path}?" . ($e->{query} // '') . " -> $e->{status}";
}

# The OAuth grant whose first refresh token was $first.
sub grant_of
{
	my ($fake, $first) = @_;
	for my $g (@{ admin($fake, 'GET', 'oauth')->{grants} })
	{
		return $g if @{ $g->{refresh_tokens} } && $g->{refresh_tokens}[0]{token} eq $first;
	}
	return undef;
}

# ---------------------------------------------------------------------------
# Helpers: the database
# ---------------------------------------------------------------------------

# (exit code, stderr) of a statement that is expected to fail.
sub psql_fails
{
	my ($query) = @_;
	my ($out, $err) = ('', '');
	my $ret = $node->psql('postgres', encode_utf8($query), stdout => \$out, stderr => \$err);
	return ($ret, decode_utf8($err));
}

sub columns_of
{
	my ($source, $collection) = @_;
	return $jtext->decode(sql(
		"SELECT json_agg(json_build_object('api_field', api_field, 'api_type', api_type, "
		  . "'column_name', column_name, 'column_type', column_type, 'is_key', is_key) ORDER BY position) "
		  . "FROM sync.columns WHERE source = " . lit($source) . " AND collection = " . lit($collection)));
}

sub stored_refresh_token
{
	my ($source) = @_;
	return sql("SELECT ss.credentials->>'refresh_token' FROM sync.source_secrets ss "
		  . "JOIN sync.sources s ON s.id = ss.source_id WHERE s.name = " . lit($source));
}

sub qi
{
	my ($name) = @_;
	$name =~ s/"/""/g;
	return qq{"$name"};
}

# Test names and diagnostics go to handles without an encoding: escape what is not ASCII.
sub ascii
{
	my ($s) = @_;
	$s =~ s/([^\x00-\x7f])/sprintf('\\x{%x}', ord($1))/ge;
	return $s;
}

# ---------------------------------------------------------------------------
# Helpers: independent conversion of API values, and table comparison
# ---------------------------------------------------------------------------

# Seconds since the epoch of an Airtable timestamp ("2024-05-01T12:34:56.000Z").
sub at_epoch
{
	my ($s) = @_;
	my @p = "$s" =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z$/ or return undef;
	my $e = days_from_civil(@p[ 0 .. 2 ]) * 86400 + $p[3] * 3600 + $p[4] * 60 + $p[5];
	$e += "0.$p[6]" if defined $p[6];
	return $e;
}

# An exact decimal in one normal form: digits without leading/trailing zeros and an exponent.
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

sub sig_digits
{
	my ($d) = dec_norm($_[0]) =~ /^-?(\d+)/;
	return length($d // '');
}

# exact: the decimal as is; else a number of more than 15 significant digits is rounded to 15.
sub num_canon
{
	my ($s, $exact) = @_;
	return 'n:' . dec_norm($s) if $exact || sig_digits($s) <= 15;
	return 'n:' . dec_norm(sprintf('%.15g', "$s"));
}

# What a decoded JSON value is; call before anything stringifies it.
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

# A JSON structure with numbers, strings and booleans told apart, numbers as exact decimals.
sub canon_struct
{
	my ($v, $exact) = @_;
	my $k = jkind($v);
	return undef if $k eq 'null';
	return 'b:' . ($v ? 'true' : 'false') if $k eq 'bool';
	return num_canon($v, $exact) if $k eq 'num';
	return "s:$v" if $k eq 'str';
	return [ map { canon_struct($_, $exact) } @$v ] if $k eq 'array';
	return { map { $_ => canon_struct($v->{$_}, $exact) } keys %$v } if $k eq 'object';
	return "?$k";
}

my %TEXT_TYPE = map { $_ => 1 }
  qw(recordId singleLineText multilineText richText email url phoneNumber singleSelect);
my %NUMBER_TYPE = map { $_ => 1 } qw(number currency percent rating duration count autoNumber);
my %ARRAY_TYPE = map { $_ => 1 } qw(multipleSelects multipleRecordLinks);
my %TIME_TYPE = map { $_ => 1 } qw(dateTime createdTime lastModifiedTime);

# The column type a field type calls for (format_type spelling).
sub want_column_type
{
	my ($t) = @_;
	return 'text' if $TEXT_TYPE{$t};
	return 'bigint' if $t eq 'autoNumber';
	return 'numeric' if $NUMBER_TYPE{$t};
	return 'boolean' if $t eq 'checkbox';
	return 'text[]' if $ARRAY_TYPE{$t};
	return 'date' if $t eq 'date';
	return 'timestamp with time zone' if $TIME_TYPE{$t};
	return 'jsonb';    # formula, lookup, rollup, attachments, ...
}

# The expected value of an API field (undef: omitted from the record), as a comparable string.
sub expect_canon
{
	my ($type, $v, $exact) = @_;
	my $k = jkind($v);
	if ($type eq 'checkbox')
	{
		return 'b:false' if $k eq 'null';    # an unchecked box is omitted
		return ($k eq 'bool' && $v) ? 'b:true' : "api-checkbox-$k";
	}
	return 'NULL' if $k eq 'null';
	return $k eq 'str' ? "s:$v" : "api-$k" if $TEXT_TYPE{$type};
	return $k eq 'num' ? num_canon($v, $exact) : "api-$k" if $NUMBER_TYPE{$type};
	return $k eq 'array' ? 'a:' . $json->encode([ map { "$_" } @$v ]) : "api-$k" if $ARRAY_TYPE{$type};
	return "d:$v" if $type eq 'date';
	if ($TIME_TYPE{$type})
	{
		my $e = at_epoch($v);
		return defined $e ? sprintf('e:%.3f', $e) : "bad-api-time:$v";
	}
	return 'j:' . $json->encode(canon_struct($v, $exact));
}

# The table's value (as rendered by json_agg, see select_expr) as a comparable string.
sub got_canon
{
	my ($type, $g, $exact) = @_;
	my $k = jkind($g);
	return 'NULL' if $k eq 'null';
	return $k eq 'bool' ? 'b:' . ($g ? 'true' : 'false') : "table-$k" if $type eq 'checkbox';
	return $k eq 'str' ? "s:$g" : "table-$k" if $TEXT_TYPE{$type};
	return $k eq 'num' ? num_canon($g, $exact) : "table-$k" if $NUMBER_TYPE{$type};
	return $k eq 'array' ? 'a:' . $json->encode([ map { "$_" } @$g ]) : "table-$k" if $ARRAY_TYPE{$type};
	return "d:$g" if $type eq 'date';
	return $k eq 'num' ? sprintf('e:%.3f', "$g") : "table-$k" if $TIME_TYPE{$type};
	return 'j:' . $json->encode(canon_struct($g, $exact));
}

# A normalized decimal (see dec_norm) written out plainly, for diagnostics.
sub plain_decimals
{
	my ($s) = @_;
	$s =~ s{n:(-?)(\d+)(?:e(-?\d+))?}{
		my ($sign, $d, $e) = ($1, $2, $3 // 0);
		my $out = $e >= 0 ? $d . ('0' x $e)
		  : length($d) > -$e ? substr($d, 0, length($d) + $e) . '.' . substr($d, length($d) + $e)
		  : '0.' . ('0' x (-$e - length($d))) . $d;
		"n:$sign$out";
	}ge;
	return $s;
}

# 'equal'; 'precision' when the API sent more than 15 significant digits and the table has the
# value rounded to 15 (reported separately, see the end); else a description of the difference.
sub compare_value
{
	my ($type, $v, $g) = @_;
	my $want = expect_canon($type, $v, 1);
	my $have = got_canon($type, $g, 1);
	return ('equal', $want) if $want eq $have;
	my $want15 = expect_canon($type, $v, 0);
	my $what = plain_decimals("table $have, API $want");
	return ('precision', $what) if $want15 ne $want && $want15 eq got_canon($type, $g, 0);
	return ('diff', $what);
}

# Does the API value hold a number of more than 15 significant digits?
sub long_number
{
	my ($type, $v) = @_;
	return 0 if $TEXT_TYPE{$type} || $ARRAY_TYPE{$type} || $TIME_TYPE{$type} || $type eq 'date'
	  || $type eq 'checkbox';
	return expect_canon($type, $v, 1) ne expect_canon($type, $v, 0);
}

sub select_expr
{
	my ($c) = @_;
	my $col = qi($c->{column_name});
	my $expr = $TIME_TYPE{ $c->{api_type} } ? "extract(epoch FROM $col)" : $col;
	return "$expr AS " . qi($c->{api_field});
}

my @precision_diffs;        # values stored with fewer digits than the API sent
my $long_numbers_seen = 0;  # values with more than 15 significant digits compared

# Compare a synced table with the API's records, every column of every record.
sub compare_table
{
	my ($label, $table, $cols, $expected) = @_;
	$label = ascii($label);
	my $rows = $jsql->decode(sql(
		"SELECT coalesce(json_agg(x ORDER BY x.id), '[]') FROM (SELECT "
		  . join(', ', map { select_expr($_) } @$cols) . " FROM $table) x"));
	my ($n, $ndistinct) = split /\|/, sql("SELECT count(*), count(DISTINCT id) FROM $table");
	my %got = map { $_->{id} => $_ } @$rows;
	my %exp = map { $_->{id} => $_ } @$expected;
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
		for my $c (@$cols)
		{
			my $f = $c->{api_field};
			my $v = $f eq 'id' ? $exp{$id}{id} : $exp{$id}{fields}{$f};
			$values++;
			$long_numbers_seen++ if long_number($c->{api_type}, $v);
			my ($verdict, $what) = compare_value($c->{api_type}, $v, $g->{$f});
			next if $verdict eq 'equal';
			my $line = "$id $f $c->{column_name} ($c->{api_type}): $what";
			if ($verdict eq 'precision')
			{
				push @precision_diffs, "$label: $line";
			}
			else
			{
				push @diff, $line;
			}
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
	  or diag(ascii(join("\n", @diff[0 .. ($#diff < 19 ? $#diff : 19)])));
	return \%got;
}

# ---------------------------------------------------------------------------
# The helpers themselves
# ---------------------------------------------------------------------------

is(at_epoch('1970-01-01T00:00:00.000Z'), 0, 'time helper: epoch 0');
is(at_epoch('2024-05-01T12:34:56.789Z'), 1714566896.789, 'time helper: a known instant');
is(dec_norm('412.180'), dec_norm('412.18'), 'decimal helper: trailing zeros do not matter');
isnt(dec_norm('412.18'), dec_norm('412.18000000000001'), 'decimal helper: 412.18 is not 412.18000000000001');
is(plain_decimals('n:' . dec_norm('-0.0300') . ' n:' . dec_norm('1200') . ' n:' . dec_norm('12.5')), 'n:-0.03 n:1200 n:12.5',
	'decimal helper: written out plainly');
{
	my $n = sub { $jexact->decode($_[0]) };
	is((compare_value('number', $n->('412.18'), $n->('412.180')))[0], 'equal', 'compare: 412.18 = 412.180');
	is((compare_value('number', $n->('412.18'), $n->('412.18000000000001')))[0], 'diff',
		'compare: 412.18 stored as 412.18000000000001 is a difference');
	is((compare_value('number', $n->('300.6893909626719'), $n->('300.689390962672')))[0], 'precision',
		'compare: 16 digits stored as 15 is a precision loss');
	is((compare_value('number', $n->('5'), $n->('"5"')))[0], 'diff', 'compare: a number is not a string');
	is((compare_value('checkbox', undef, $n->('false')))[0], 'equal', 'compare: an omitted checkbox is false');
	is((compare_value('checkbox', undef, undef))[0], 'diff', 'compare: an omitted checkbox is not null');
	is((compare_value('multipleSelects', undef, $n->('[]')))[0], 'diff', 'compare: omitted is null, not {}');
	is((compare_value('formula', $n->('{"a":[1,"x",true]}'), $n->('{"a":[1,"x",true]}')))[0], 'equal',
		'compare: jsonb structures');
	is((compare_value('formula', $n->('{"a":[1,"x",true]}'), $n->('{"a":[1,"x",1]}')))[0], 'diff',
		'compare: jsonb true is not 1');
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

my $A = start_fake('airtable', 'a', '--rate-limit', 0, '--token-rate-limit', 0, '--seed', 1);
my $B = start_fake('airtable', 'b', '--rate-limit', 0, '--token-rate-limit', 0, '--tables', 1, '--records', 2000,
	'--seed', 2);
# Attachment URLs (expiry-signed) change every hour: start both fake clocks at the top of an hour
# so that none passes while the test runs.
my $hour_start = strftime('%Y-%m-%dT%H:00:05Z', gmtime(time));
admin($_, 'POST', 'clock', { now => $hour_start }) for ($A, $B);

# (start_node also runs CREATE EXTENSION sync)
$node = start_node(max_backoff => 4, initdb_extra => [ '--encoding=UTF8', '--locale=C' ], utf8 => 1);

my $admin_a = admin($A, 'GET', '');
my $base_id = $admin_a->{bases}[0];
my $pat_a = $admin_a->{pat};
my $schema = admin($A, 'GET', "schema/$base_id")->{tables};
my ($contacts, $companies, $tasks) = @$schema;
is(ascii(join(' | ', map { $_->{name} } @$schema)), ascii(qq{Contacts | Companies & Partners | Zo\x{eb}'s "Tasks" \x{1f680}}),
	'the fake base has three tables, one with quotes and an emoji in its name');

# ---------------------------------------------------------------------------
# 1. Backfill of every table of the base, over OAuth
# ---------------------------------------------------------------------------

sql("SELECT sync.create_source('base', 'airtable', '$A->{url}', '$oauth_creds', "
	  . "'{\"base_id\": \"$base_id\", \"requests_per_second\": 50, \"poll_interval\": 1, \"sweep_interval\": 4}')");
my %rel;
$rel{ $_->{id} } = sql("SELECT sync.add_collection('base', " . lit($_->{name}) . ')') for @$schema;
is($rel{ $contacts->{id} }, 'base.contacts', 'add_collection creates base.contacts');
is($rel{ $companies->{id} }, 'base.companies_partners', 'and base.companies_partners');
is(ascii($rel{ $tasks->{id} }), ascii(qq{base."zo\x{eb}_s_tasks_\x{1f680}"}), 'and a table for the quoted emoji name');
for my $t (@$schema)
{
	my $tn = ascii($t->{name});
	is(sql("SELECT sync.wait_for_backfill('base', " . lit($t->{name}) . ", '120s')"), 't',
		"backfill of $tn completes");
}
note('backfill of the base done at ' . elapsed());

my %cols;
for my $t (@$schema)
{
	my $tn = ascii($t->{name});
	my $st = status_of('base', $t->{name});
	is($st->{target_table}, $rel{ $t->{id} }, "$tn: status shows its table");
	is($st->{state}, 'syncing', "$tn: state syncing after the backfill");
	is($st->{phase}, 'incremental', "$tn: phase incremental");
	is($st->{backfill_records}, 500, "$tn: backfill_records = 500");
	ok(defined $st->{backfill_completed_at}, "$tn: backfill_completed_at set");
	ok($st->{consecutive_failures} == 0 && !defined $st->{last_error}, "$tn: no error")
	  or diag('last_error: ' . ($st->{last_error} // 'none'));

	my $cols = $cols{ $t->{id} } = columns_of('base', $t->{name});
	is(join(',', map { $_->{api_field} } @$cols), join(',', 'id', map { $_->{id} } @{ $t->{fields} }),
		"$tn: sync.columns has the record id and every field (by field id), in order");
	my %type = (id => 'recordId', map { $_->{id} => $_->{type} } @{ $t->{fields} });
	my $actual = $jtext->decode(sql(
		"SELECT json_object_agg(attname, format_type(atttypid, atttypmod)) FROM pg_attribute "
		  . "WHERE attrelid = " . lit($rel{ $t->{id} }) . "::regclass AND attnum > 0 AND NOT attisdropped"));
	my @bad;
	for my $c (@$cols)
	{
		my $ft = $type{ $c->{api_field} } // 'not-in-schema';
		push @bad, "$c->{api_field}: api_type $c->{api_type}, schema type $ft" if $c->{api_type} ne $ft;
		my $want = want_column_type($ft);
		my $have = $actual->{ $c->{column_name} } // 'no such column';
		push @bad, "$c->{api_field} ($ft) column $c->{column_name}: $have, want $want" if $have ne $want;
	}
	is(scalar(@bad), 0, "$tn: every column has the type its field calls for") or diag(ascii(join("\n", @bad)));
	is(join(',', map { $_->{column_name} } grep { $_->{is_key} } @$cols), 'id', "$tn: id is the key");
	compare_table("backfill of $tn", $rel{ $t->{id} }, $cols, admin_exact($A, 'GET', "records/$base_id/$t->{id}"));
}
{
	my %type = map { $_->{id} => $_->{type} } map { @{ $_->{fields} } } @$schema;
	my %types_seen = map { $_ => 1 } values %type;
	is(join(',', sort keys %types_seen),
		'autoNumber,checkbox,createdTime,currency,date,dateTime,duration,email,formula,lastModifiedTime,'
		  . 'multilineText,multipleAttachments,multipleLookupValues,multipleRecordLinks,multipleSelects,'
		  . 'number,percent,phoneNumber,rating,richText,rollup,singleLineText,singleSelect,url',
		'the compared tables cover every common field type');
}

my $log = admin($A, 'GET', 'requests');
for my $t (@$schema)
{
	my $tn = ascii($t->{name});
	my @pages = grep { !exists $_->{params}{filterByFormula} && !exists $_->{params}{'fields[]'} }
	  list_requests($log, $t->{name});
	is(scalar(@pages), 5, "$tn: the backfill read 5 pages of 100")
	  or diag(ascii(join("\n", map { brief_entry($_) } @pages)));
	ok(@pages && !exists $pages[0]{params}{offset} && !grep({ !exists $_->{params}{offset} } @pages[ 1 .. $#pages ]),
		"$tn: the first page without an offset, the others following the offsets");
	is(scalar(grep { $_->{status} != 200 || $_->{params}{returnFieldsByFieldId} ne 'true'
				  || $_->{params}{pageSize} ne '100' } @pages), 0,
		"$tn: pages of 100 with fields by id, all answered 200");
}
{
	my $g = grant_of($A, 'test-refresh');
	ok($g && !$g->{revoked}, 'OAuth grant not revoked (no refresh token replayed)');
	my @chain = @{ $g->{refresh_tokens} };
	my $stored = stored_refresh_token('base');
	cmp_ok(scalar(@chain), '>=', 2, 'the refresh token was rotated');
	isnt($stored, 'test-refresh', 'sync.source_secrets holds the rotated refresh token');
	is($stored, $chain[-1]{token}, 'the stored refresh token is the newest the fake issued');
	ok(!$chain[-1]{used}, 'and it is unused');
	is(scalar(grep { $_->{used} } @chain), $#chain, 'every older refresh token is used');
	my @tok = grep { is_token_request($_) } @$log;
	is(scalar(@tok), $#chain, 'one token request per rotation: no refresh token used twice');
	is(scalar(grep { $_->{status} != 200 } @tok), 0, 'every token request answered 200');
	is(sql("SELECT ss.credentials->>'client_id' FROM sync.source_secrets ss JOIN sync.sources s "
			  . "ON s.id = ss.source_id WHERE s.name = 'base'"), 'test-client',
		'the rotation keeps the rest of the credentials');
}
note('section 1 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 2. Changes after the backfill (base.contacts)
# ---------------------------------------------------------------------------

my %F = map { $_->{name} => $_->{id} } @{ $contacts->{fields} };
my %col = map { $_->{api_field} => $_->{column_name} } @{ $cols{ $contacts->{id} } };
my $CT = $rel{ $contacts->{id} };
my $rec_path = "records/$base_id/$contacts->{id}";
sub ccol { return qi($col{ $F{ $_[0] } }); }

my $recs = admin_exact($A, 'GET', $rec_path);
my @ids = map { $_->{id} } @$recs;
my ($E1) = map { $_->{id} } grep {
	my $f = $_->{fields};
	defined $f->{ $F{Notes} } && defined $f->{ $F{Tags} } && defined $f->{ $F{Active} }
	  && defined $f->{ $F{Score} } && defined $f->{ $F{Birthday} }
} @$recs[ 20 .. $#$recs ];
ok(defined $E1, 'a record has notes, tags, a checked box, a score and a birthday');
my ($U1, $P1, $D1, $D2) = @ids[ 10, 11, 12, 13 ];
my $company = admin($A, 'GET', "records/$base_id/$companies->{id}")->[0]{id};

my $t_changes = sql('SELECT now()');
my $C1 = admin($A, 'POST', $rec_path, { fields => {
	Name => qq{Nova "N\x{f6}" O'Neil \x{1f389}}, Notes => "created\nafter the backfill",
	Email => 'nova@example.com', Score => '12.5', Revenue => '1000000.01', Discount => '0.125',
	Active => JSON::PP::true, Status => 'Customer', Tags => [ 'VIP', "\x{1f680} Launch" ],
	Birthday => '1990-02-03', 'Next Call' => '2025-04-01T10:30:00.000Z', Rating => 5,
	Company => [$company], Files => [ { filename => 'contract.pdf', type => 'application/pdf', size => 4321 } ] } })->{id};
admin($A, 'PATCH', "$rec_path/$U1", { fields => {
	Name => 'Renamed Person', Score => '412.18', Revenue => '0.1', Discount => '0.275', Status => 'Churned',
	Tags => ['Partner'] } });
admin($A, 'PATCH', "$rec_path/$E1", { fields => {
	Notes => undef, Tags => [], Active => JSON::PP::false, Score => undef, Birthday => '', Files => [] } });
# More than 15 significant digits, as JavaScript prints 0.1 + 0.2 (sent as text so Perl keeps them).
admin($A, 'PATCH', "$rec_path/$P1", { fields => {
	Name => 'Precise Person', Score => '0.30000000000000004', Revenue => '1234.5678901234567' } });
{
	my $e1 = admin_exact($A, 'GET', "$rec_path/$E1");
	is(join(',', grep { exists $e1->{fields}{ $F{$_} } } qw(Notes Tags Active Score Birthday Files)), '',
		'the fake omits the emptied fields of the record');
}
admin($A, 'DELETE', "$rec_path/$D1");
admin($A, 'DELETE', "$rec_path/$D2");

ok(wait_sql(90, "SELECT (SELECT count(*) FROM $CT WHERE id = '$C1') = 1 "
	  . "AND (SELECT " . ccol('Name') . " = 'Renamed Person' FROM $CT WHERE id = '$U1') "
	  . "AND (SELECT " . ccol('Name') . " = 'Precise Person' FROM $CT WHERE id = '$P1') "
	  . "AND (SELECT " . ccol('Notes') . " IS NULL FROM $CT WHERE id = '$E1') "
	  . "AND NOT EXISTS (SELECT 1 FROM $CT WHERE id IN ('$D1', '$D2'))"),
	'a create, updates, emptied fields and two deletes reach base.contacts');
note('changes synced at ' . elapsed());
is(sql("SELECT ARRAY[" . join(', ', map { ccol($_) . ' IS NULL' } qw(Notes Tags Score Birthday Files))
		  . ", " . ccol('Active') . "]::text FROM $CT WHERE id = '$E1'"),
	'{t,t,t,t,t,f}', 'emptied fields became null (the checkbox false), not left as they were');
is(sql("SELECT " . ccol('Score') . "::text || ' ' || " . ccol('Revenue') . "::text || ' ' || "
		  . ccol('Discount') . "::text FROM $CT WHERE id = '$U1'"),
	'412.18 0.1 0.275', 'numbers are stored exactly as sent (412.18, not 412.18000000000001)');
{
	my $st = status_of('base', 'Contacts');
	is(sql("SELECT last_sweep_at > '$t_changes' FROM sync.status WHERE source = 'base' AND collection = 'Contacts'"),
		't', 'a delete sweep completed after the deletes (last_sweep_at)');
	is(sql("SELECT delete_lag > interval '0' AND delete_lag < now() - '$t_changes'::timestamptz + interval '1 minute' "
			. "FROM sync.status WHERE source = 'base' AND collection = 'Contacts'"),
		't', 'sync.status shows the delete lag: the time since the last completed sweep began');
	is($st->{records_deleted}, 2, 'records_deleted counts the two deleted records');
	like(slurp_file($node->logfile), qr/delete sweep of collection "Contacts" removed \d+ rows/,
		'the server log tells of the sweep that removed them');
	my @sweep = grep { exists $_->{params}{'fields[]'} } list_requests(admin($A, 'GET', 'requests'), 'Contacts');
	ok(@sweep && !grep({ $_->{params}{'fields[]'} ne $F{Name} || $_->{status} != 200 } @sweep),
		'sweep pages ask for one field only (the primary field, by id)')
	  or diag(join("\n", map { brief_entry($_) } @sweep[ 0 .. ($#sweep < 4 ? $#sweep : 4) ]));
}

# A bulk update: 250 records sharing one last-modified second, more than two pages of a poll.
my %special = map { $_ => 1 } ($U1, $P1, $E1, $D1, $D2, $C1);
my @bulk_ids = (grep { !$special{$_} } @ids[ 100 .. $#ids ])[ 0 .. 249 ];
admin($A, 'DELETE', 'requests');
my $bulk = admin($A, 'POST', "bulk_update/$base_id/$contacts->{id}",
	{ ids => \@bulk_ids, fields => { Notes => 'Bulk 250', Rating => 4, Status => 'On "hold"' } });
is(scalar(@{ $bulk->{ids} }), 250, 'bulk_update touched 250 records');
{
	my %stamps = map { admin($A, 'GET', "$rec_path/$_")->{lastModifiedTime} => 1 } @bulk_ids[ 0, 124, 249 ];
	is(join(',', keys %stamps), $bulk->{lastModifiedTime}, 'the 250 records share one last-modified second');
}
ok(wait_sql(90, "SELECT count(*) = 250 FROM $CT WHERE " . ccol('Notes') . " = 'Bulk 250' AND "
	  . ccol('Rating') . " = 4 AND " . ccol('Status') . " = 'On \"hold\"'"),
	'all 250 bulk-updated records reach the table');
{
	my @polls = grep { exists $_->{params}{filterByFormula} } list_requests(admin($A, 'GET', 'requests'), 'Contacts');
	cmp_ok(scalar(grep { exists $_->{params}{offset} && $_->{status} == 200 } @polls), '>=', 2,
		'a poll followed its offset over several pages');
	like(@polls ? $polls[0]{params}{filterByFormula} : '',
		qr/^IS_AFTER\(LAST_MODIFIED_TIME\(\), '\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000Z'\)$/,
		'polls filter by IS_AFTER(LAST_MODIFIED_TIME(), ...)');
}
compare_table('base.contacts after the changes', $CT, $cols{ $contacts->{id} }, admin_exact($A, 'GET', $rec_path));
note('section 2 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 4. An expired access token: refreshed with the current refresh token
# ---------------------------------------------------------------------------

{
	my $before = stored_refresh_token('base');
	my $chain_before = scalar(@{ grant_of($A, 'test-refresh')->{refresh_tokens} });
	admin($A, 'DELETE', 'requests');
	my $expired = admin($A, 'POST', 'expire_tokens');
	cmp_ok($expired->{expired}, '>=', 1, 'the fake dropped the access token in use');
	admin($A, 'PATCH', "$rec_path/$U1", { fields => { Name => 'After token expiry' } });
	ok(wait_sql(60, "SELECT " . ccol('Name') . " = 'After token expiry' FROM $CT WHERE id = '$U1'"),
		'a change made after the token expired reaches the table');
	my $g = grant_of($A, 'test-refresh');
	ok(!$g->{revoked}, 'the grant is not revoked: no refresh token was used twice');
	my %tok = map { $_->{token} => $_ } @{ $g->{refresh_tokens} };
	ok($tok{$before} && $tok{$before}{used}, 'the refresh token saved in sync.source_secrets was the one used');
	my $after = stored_refresh_token('base');
	isnt($after, $before, 'the new refresh token was saved');
	is($after, $g->{refresh_tokens}[-1]{token}, 'it is the newest the fake issued');
	ok($tok{$after} && !$tok{$after}{used}, 'and it is unused');
	is(scalar(@{ $g->{refresh_tokens} }), $chain_before + 1, 'one refresh');
	my $log = admin($A, 'GET', 'requests');
	my @i401 = grep { $log->[$_]{status} == 401 } 0 .. $#$log;
	is(scalar(@i401), 1, 'one request met the expired token');
	for my $i (@i401)
	{
		my ($e, $tok, $retry) = @$log[ $i .. $i + 2 ];
		ok($tok && is_token_request($tok) && $tok->{method} eq 'POST' && $tok->{status} == 200,
			'the 401 is followed by a token refresh') or diag($tok ? brief_entry($tok) : 'nothing');
		ok($retry && $retry->{path} eq $e->{path} && ($retry->{query} // '') eq ($e->{query} // '')
			  && $retry->{status} == 200, 'and by the same request again, answered 200')
		  or diag($retry ? brief_entry($retry) : 'nothing');
	}
	is(scalar(grep { is_token_request($_) } @$log), 1, 'one token request in all');
	is(sql("SELECT count(*) FROM sync.status WHERE source = 'base' AND (consecutive_failures > 0 OR last_error IS NOT NULL)"),
		0, 'the refresh was no error');
}
note('section 4 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 3. Offsets expiring mid-backfill (source slow on fake B, personal access token)
# ---------------------------------------------------------------------------

my $admin_b = admin($B, 'GET', '');
my $b_base = $admin_b->{bases}[0];
my $b_contacts = admin($B, 'GET', "schema/$b_base")->{tables}[0];
admin($B, 'DELETE', 'requests');
sql("SELECT sync.create_source('slow', 'airtable', '$B->{url}', '{\"access_token\": \"$admin_b->{pat}\"}', "
	  . "'{\"base_id\": \"$b_base\", \"requests_per_second\": 3}')");
is(sql("SELECT sync.add_collection('slow', 'Contacts')"), 'slow.contacts', 'add_collection creates slow.contacts');
ok(wait_sql(60, "SELECT phase = 'backfill' AND backfill_records BETWEEN 200 AND 1200 FROM sync.status "
	  . "WHERE source = 'slow'"), 'slow: backfill under way');
{
	my $expired = admin($B, 'POST', 'expire_offsets');
	my $st = status_of('slow', 'Contacts');
	ok($st->{phase} eq 'backfill' && $st->{backfill_records} < 2000,
		"slow: offsets expired mid-backfill ($st->{backfill_records} of 2000 records in)");
	cmp_ok($expired->{expired}, '>=', 1, 'the fake dropped the iterator in use');
}
is(sql("SELECT sync.wait_for_backfill('slow', 'Contacts', '120s')"), 't', 'slow: backfill completes');
{
	my $st = status_of('slow', 'Contacts');
	ok($st->{consecutive_failures} == 0 && !defined $st->{last_error}, 'slow: the expired offset was no error')
	  or diag('last_error: ' . ($st->{last_error} // 'none'));
	note("slow: backfill_records $st->{backfill_records} (records read, the restarted walk included)");
}
compare_table('slow.contacts after expired offsets', 'slow.contacts', columns_of('slow', 'Contacts'),
	admin_exact($B, 'GET', "records/$b_base/$b_contacts->{id}"));
{
	my @list = grep { !exists $_->{params}{filterByFormula} && !exists $_->{params}{'fields[]'} }
	  list_requests(admin($B, 'GET', 'requests'), 'Contacts');
	my @i422 = grep { $list[$_]{status} == 422 } 0 .. $#list;
	is(scalar(@i422), 1, 'one request met the expired offset');
	my $i = $i422[0] // 0;
	ok(exists $list[$i]{params}{offset}, 'it was a request with an offset');
	my @after = @list[ $i + 1 .. $#list ];
	ok(@after && !exists $after[0]{params}{offset} && $after[0]{status} == 200,
		'then the walk started again from the first page')
	  or diag(@after ? brief_entry($after[0]) : 'nothing after');
	is(scalar(@after), 20, 'and read all 20 pages') or diag(join("\n", map { brief_entry($_) } @after));
	is(scalar(grep { $_->{status} != 200 } @after), 0, 'every page of the new walk answered 200');
}
note('section 3 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 5. Errors are recorded, and the worker keeps going
# ---------------------------------------------------------------------------

my $pid = sql('SELECT sync.worker_pid()');
ok($pid =~ /^\d+$/, "the worker runs (pid $pid)");

# 5a. Airtable's rate limit: 5 requests per second per base, then 429s for the penalty.
admin($A, 'POST', 'rate_limits', { per_base => 5, penalty => 3 });
my $slow_poll = sql("SELECT last_poll_at FROM sync.status WHERE source = 'slow'");
sql(q{SELECT sync.alter_source('base', options => '{"requests_per_second": 20, "poll_interval": 0}')});
ok(wait_sql(60, "SELECT bool_or(state = 'rate limited' AND consecutive_failures = 0 "
	  . "AND waiting_on LIKE 'rate limit: Airtable''s 30-second penalty%' "
	  . "AND last_error LIKE 'Airtable % failed with HTTP 429 RATE_LIMIT_REACHED%') FROM sync.status WHERE source = 'base'"),
	'base: a 429 shows as state rate limited (30-second penalty) with RATE_LIMIT_REACHED in last_error');
sql(q{SELECT sync.alter_source('base', options => '{"requests_per_second": 3, "poll_interval": 1}')});
my $t_calm = sql('SELECT clock_timestamp()');
my $R1 = admin($A, 'POST', $rec_path, { fields => { Name => 'After the rate limit', Score => '1.5' } })->{id};
ok(wait_sql(90, "SELECT bool_and(consecutive_failures = 0 AND last_poll_at > '$t_calm') FROM sync.status "
	  . "WHERE source = 'base'"), 'base: every collection polls successfully again below the limit');
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM $CT WHERE id = '$R1')"), 'base: a record created after the 429s syncs');
is(sql("SELECT bool_or(last_error LIKE '%HTTP 429 RATE_LIMIT_REACHED%' AND last_error_at IS NOT NULL) "
		  . "FROM sync.status WHERE source = 'base'"), 't', 'last_error keeps the 429 for the record');
{
	my $stats = admin($A, 'GET', 'stats');
	cmp_ok($stats->{rate_limited}, '>', 0, "the fake answered 429 ($stats->{rate_limited} times)");
}
is(sql("SELECT last_poll_at > '$slow_poll' FROM sync.status WHERE source = 'slow'"), 't',
	'slow (another base) kept syncing meanwhile');
is(sql('SELECT sync.worker_pid()'), $pid, 'the same worker kept running through the 429s');
admin($A, 'POST', 'rate_limits', { per_base => 0, clear_penalties => JSON::PP::true });
sql(q{SELECT sync.alter_source('base', options => '{"requests_per_second": 50}')});

# 5b. A table the base does not have: an error of add_collection, with the tables in the hint.
{
	my ($ret, $err) = psql_fails("SELECT sync.add_collection('base', 'No Such Table')");
	isnt($ret, 0, 'add_collection of an unknown table fails');
	like($err, qr/ERROR:  Airtable base "\Q$base_id\E" has no table "No Such Table"/, 'naming the table');
	like($err, qr/HINT:  Its tables are: "Contacts", "Companies & Partners", "Zo\x{eb}'s "Tasks" \x{1f680}"\./,
		'the hint lists the tables of the base');
	($ret, $err) = psql_fails("SELECT sync.add_collection('base', 'CONTACTS')");
	like($err, qr/collection "Contacts" of source "base" is already synced/,
		'a table name in another case is the same table');
	is(sql("SELECT count(*) FROM sync.collections c JOIN sync.sources s ON s.id = c.source_id WHERE s.name = 'base'"),
		3, 'no collection was added');
}

# 5c. A wrong base id: well-formed but unknown fails at add_collection, malformed at create_source.
{
	sql("SELECT sync.create_source('wrongbase', 'airtable', '$A->{url}', '{\"access_token\": \"$pat_a\"}', "
		  . "'{\"base_id\": \"appZZZZZZZZZZZZZZ\", \"requests_per_second\": 50}')");
	my ($ret, $err) = psql_fails("SELECT sync.add_collection('wrongbase', 'Contacts')");
	isnt($ret, 0, 'add_collection with a wrong base_id fails');
	like($err, qr/ERROR:  Airtable base "appZZZZZZZZZZZZZZ" does not exist or the token cannot read it/,
		'naming the base');
	like($err, qr/HINT:  Check the source's base_id/, 'with a hint');
	is(sql("SELECT to_regclass('wrongbase.contacts') IS NULL"), 't', 'no table was created');
	sql("SELECT sync.drop_source('wrongbase')");
	($ret, $err) = psql_fails("SELECT sync.create_source('badid', 'airtable', '$A->{url}', "
		  . "'{\"access_token\": \"$pat_a\"}', '{\"base_id\": \"Contacts\"}')");
	like($err, qr/an airtable source needs the option "base_id"/, 'a malformed base_id fails at create_source');
}

# 5d. A failed add_collection must not lose the rotated refresh token (single use: the fake
#     revokes the grant when a used one comes back).
{
	admin($A, 'POST', 'oauth/grant', { refresh_token => 'probe-refresh' });
	sql("SELECT sync.create_source('probe', 'airtable', '$A->{url}', "
		  . "'{\"client_id\": \"test-client\", \"refresh_token\": \"probe-refresh\"}', "
		  . "'{\"base_id\": \"$base_id\", \"requests_per_second\": 50}')");
	my ($ret, $err) = psql_fails("SELECT sync.add_collection('probe', 'No Such Table')");
	like($err, qr/has no table "No Such Table"/, 'probe: add_collection of an unknown table fails');
	my $g = grant_of($A, 'probe-refresh');
	my %tok = map { $_->{token} => $_ } @{ $g->{refresh_tokens} };
	my $stored = stored_refresh_token('probe');
	ok($tok{$stored} && !$tok{$stored}{used},
		'probe: after the failed add_collection, the stored refresh token is still usable')
	  or diag("stored refresh token $stored is " . ($tok{$stored} ? 'used' : 'unknown') . ' at the fake; the '
		  . 'rotated one was saved in the transaction that the error rolled back');
	($ret, $err) = psql_fails("SELECT sync.add_collection('probe', 'Companies & Partners')");
	is($ret, 0, 'probe: the next add_collection works') or diag(ascii($err));
	ok(!grant_of($A, 'probe-refresh')->{revoked}, 'probe: the OAuth grant was not revoked');
	sql("SELECT sync.drop_source('probe', true)");
}
note('section 5 done at ' . elapsed());

# ---------------------------------------------------------------------------
# The end: base.contacts once more, OAuth state, precision
# ---------------------------------------------------------------------------

compare_table('base.contacts at the end', $CT, $cols{ $contacts->{id} }, admin_exact($A, 'GET', $rec_path));
{
	my $st = status_of('base', 'Contacts');
	is($st->{records_deleted}, 2, 'base.contacts: records_deleted = 2 (nothing else swept away)');
	my $g = grant_of($A, 'test-refresh');
	my $stored = stored_refresh_token('base');
	ok(!$g->{revoked} && $stored eq $g->{refresh_tokens}[-1]{token} && !$g->{refresh_tokens}[-1]{used},
		'base: the grant is alive and the stored refresh token is the newest, unused');
}
is(sql('SELECT sync.worker_pid()'), $pid, 'the same worker ran to the end');

cmp_ok($long_numbers_seen, '>', 0, "values with more than 15 significant digits were compared ($long_numbers_seen)");
# Numeric columns first in the examples: they show the loss most plainly.
@precision_diffs = ((grep { !/\(formula\)|\(rollup\)|\(multipleLookupValues\)/ } @precision_diffs),
	(grep { /\(formula\)|\(rollup\)|\(multipleLookupValues\)/ } @precision_diffs));
is(scalar(@precision_diffs), 0,
	'numbers of more than 15 significant digits are stored with every digit the API sent')
  or diag(scalar(@precision_diffs) . " values lost digits, e.g.\n"
	  . ascii(join("\n", @precision_diffs[ 0 .. ($#precision_diffs < 9 ? $#precision_diffs : 9) ])));

note('total ' . elapsed());
$node->stop;
done_testing();
